"""What every stage runner shares: its progress bar."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` frames (silent when not ``enabled`` or when there is nothing to do)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled or total == 0,
                dynamic_ncols=True, leave=False)
