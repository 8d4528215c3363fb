"""A dependency-free progress bar for evaluation and prediction."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar('T')


def progress(items: Iterable[T], total: int | None, desc: str, *, enabled: bool = True,
             stream=None) -> Iterator[T]:
  """Yields ``items`` while drawing ``desc [#####.....] i/total  r it/s`` on stderr.

  On a terminal the bar is redrawn in place; otherwise one line is printed at
  the end, so logs stay readable.
  """
  stream = stream or sys.stderr
  interactive = enabled and getattr(stream, 'isatty', lambda: False)()
  start = time.perf_counter()
  count = 0

  def draw(final: bool):
    rate = count / max(time.perf_counter() - start, 1e-9)
    if total:
      filled = int(30 * count / total)
      bar = '#' * filled + '.' * (30 - filled)
      text = f'{desc} [{bar}] {count}/{total} {rate:.1f} it/s'
    else:
      text = f'{desc} {count} {rate:.1f} it/s'
    stream.write(('\r' if interactive else '') + text + ('\n' if final else ''))
    stream.flush()

  for item in items:
    yield item
    count += 1
    if interactive:
      draw(final=False)
  if enabled:
    draw(final=True)
