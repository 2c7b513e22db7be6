"""Test assertions shared by every test folder (a unique module name: several conftest.py exist)."""

import torch


def assert_close(actual, expected, *, rtol: float = 1e-4, atol: float = 1e-5,
                 max_report: int = 5) -> None:
    """Asserts |actual - expected| <= atol + rtol * |expected| elementwise, NaN matching NaN.

    Args:
        actual, expected: tensors (or array-likes) of the same shape; compared in float64.
        rtol, atol: relative and absolute tolerance.
        max_report: how many of the first mismatches the failure message lists.
    """
    actual = torch.as_tensor(actual).detach().cpu().to(torch.float64)
    expected = torch.as_tensor(expected).detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = actual.isnan() & expected.isnan()
    ok = both_nan | ((actual - expected).abs() <= atol + rtol * expected.abs())
    ok &= ~(actual.isnan() ^ expected.isnan())
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    lines = [f"{int((~ok).sum())} of {ok.numel()} elements differ (rtol={rtol}, atol={atol}):"]
    for position in bad[:max_report].tolist():
        where = tuple(position)
        lines.append(f"  at {where}: actual {actual[where].item():.8g}, "
                     f"expected {expected[where].item():.8g}")
    raise AssertionError("\n".join(lines))
