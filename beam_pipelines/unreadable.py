"""Images that cannot be read: the side output that carries them, their count
and first names, and the rule that fails a run when there are too many.

A step that reads images sends ``(name, reason)`` to the :data:`BAD_IMAGES`
side output for each image it cannot read, fetch or decode (a file that is
empty, not an image, truncated, missing or not readable); such an image is
counted and named, never fatal there. :class:`CountUnreadable` gathers
them into one :class:`Unreadable`; :func:`check_unreadable` then fails the
run, in one line naming the first file and why, when more than
``--max-bad-fraction`` of the target's images are unreadable, or all are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import apache_beam as beam

__all__ = ["BAD_IMAGES", "FIRST_NAMED", "Unreadable", "FirstUnreadable", "CountUnreadable", "check_unreadable"]

#: Tag of the side output that carries ``(name, reason)`` of unreadable images.
BAD_IMAGES = "bad_images"
#: Unreadable images named in a summary (the first by name).
FIRST_NAMED = 100


@dataclass
class Unreadable:
    """How many images could not be read, and the first :data:`FIRST_NAMED`
    of them by name, as ``(name, reason)`` sorted by name."""

    count: int = 0
    first: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.first]


class FirstUnreadable(beam.CombineFn):
    """``(name, reason)`` elements -> one :class:`Unreadable` (exact count; the
    smallest names, whatever the order they came in)."""

    def create_accumulator(self):
        return Unreadable()

    def add_input(self, acc: Unreadable, element) -> Unreadable:
        return self.merge_accumulators([acc, Unreadable(1, [tuple(element)])])

    def merge_accumulators(self, accumulators) -> Unreadable:
        count, first = 0, []
        for acc in accumulators:
            count += acc.count
            first.extend(acc.first)
        return Unreadable(count, sorted(first)[:FIRST_NAMED])

    def extract_output(self, acc: Unreadable) -> Unreadable:
        return acc


class CountUnreadable(beam.PTransform):
    """PCollection of ``(name, reason)`` -> one :class:`Unreadable`."""

    def expand(self, bad):
        return bad | "FirstUnreadable" >> beam.CombineGlobally(FirstUnreadable())


def check_unreadable(unreadable: Unreadable, readable: int, max_fraction: float, what: str) -> None:
    """Raise ``ValueError`` (one line: the counts, the first file and why)
    when more than ``max_fraction`` of ``readable + unreadable.count`` images,
    or all of them, could not be read; ``what`` names them (e.g. "target
    images")."""
    total = readable + unreadable.count
    fraction = unreadable.count / total if total else 0.0
    if readable and fraction <= max_fraction:
        return
    if unreadable.first:
        name, reason = unreadable.first[0]
        first = f"first: {name} ({reason})"
        more = [n for n, _ in unreadable.first[1:5]]
        first += f"; then {more}" if more else ""
    else:
        first = "none listed"
    if not readable:
        raise ValueError(f"none of the {total} {what} could be read; {first}")
    raise ValueError(f"{unreadable.count} of {total} {what} are unreadable ({fraction:.2%} > --max-bad-fraction "
                     f"{max_fraction:.2%}); {first}")
