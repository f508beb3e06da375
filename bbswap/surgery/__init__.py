"""Apply a recipe's ops to a copy of a backbone."""
