"""User code that exits, is interrupted or never returns: one line, exit 2, never a
silent exit 0 (``SystemExit`` passes ``except Exception``) and never a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, cli

from bbswap.backbones.guard import time_limit, user_code
from bbswap.errors import ModelError
from bbswap.tracing.inspection import inspect_backbone

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = FIXTURES / "misbehaving_models.py"


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        (f"{MODELS}:ExitsInInit", ("constructor", "sys.exit(3)")),
        (f"{FIXTURES / 'exits_on_import.py'}:Never", ("importing", "sys.exit(3)")),
        (f"{MODELS}:ExitsInForward", ("forward", "sys.exit(None)")),
        (f"{MODELS}:InterruptedForward", ("forward", "KeyboardInterrupt")),
    ],
)
def test_exits_and_interrupts_are_one_line_errors(spec: str, fragments: tuple[str, ...]) -> None:
    assert_one_line_error(cli("inspect", spec, "--input", "1x3x32x32"), *fragments)


def test_an_endless_forward_stops_at_the_time_limit() -> None:
    start = time.monotonic()
    with time_limit(1), pytest.raises(ModelError, match="time limit of 1 s") as stopped:
        inspect_backbone(f"{MODELS}:EndlessForward", "1x3x32x32")
    assert time.monotonic() - start < 30
    assert "\n" not in str(stopped.value)


def test_an_inner_guard_keeps_the_outer_deadline() -> None:
    start = time.monotonic()
    with time_limit(1), pytest.raises(ModelError, match="outer"), user_code("outer"):
        with time_limit(60), user_code("inner"):
            time.sleep(0.2)  # the inner block ends in time; the outer alarm goes on
        while True:
            time.sleep(0.05)
    assert time.monotonic() - start < 10


def test_a_time_limit_must_be_positive() -> None:
    with pytest.raises(ModelError, match="positive"), time_limit(0):
        pass


def _load(name: str):
    from bbswap.backbones.registry import resolve

    return resolve(f"{MODELS}:{name}").build()


def test_a_forward_that_updates_a_buffer_leaves_the_callers_buffer_unchanged() -> None:
    model = _load("CountsCalls")
    buffer = model.calls
    report = inspect_backbone(model, "1x3x32x32")
    assert report.trace.device == "fake"
    assert model.calls is buffer and int(buffer) == 0


def test_the_cpu_fallback_leaves_weights_and_buffers_as_they_were() -> None:
    model = _load("CountsAndNudgesOnCpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = dict(model.state_dict(keep_vars=True))
    report = inspect_backbone(model, "1x3x32x32")
    assert report.trace.device == "cpu"
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors[k] for k in tensors)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_timeout_option_stops_an_endless_forward() -> None:
    result = cli("inspect", f"{MODELS}:EndlessForward", "--input", "1x3x32x32", "--timeout", "2")
    assert_one_line_error(result, "time limit of 2 s", "--timeout")


def test_verify_never_passes_a_file_whose_forward_exits() -> None:
    result = cli("verify", f"{MODELS}:ExitsInForward", "--channels", "8", "--stride", "2")
    assert_one_line_error(result, "sys.exit(None)")


def test_a_model_that_prints_leaves_json_output_parseable() -> None:
    import json

    result = cli("inspect", f"{MODELS}:Chatty", "--input", "1x3x32x32", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == [1, 8, 16, 16]
    assert "forward of Chatty" in result.stderr


def test_the_time_limit_also_holds_outside_the_main_thread() -> None:
    import threading

    errors: list[str] = []

    def run() -> None:
        try:
            with time_limit(1):
                inspect_backbone(f"{MODELS}:EndlessForward", "1x3x32x32")
        except ModelError as error:
            errors.append(str(error))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert len(errors) == 1 and "time limit of 1 s" in errors[0]
