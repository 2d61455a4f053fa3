"""The toolkit's own error types: every bad input, output or run ends in one of these, with one line.

All derive from `VisEditError` (a ValueError, so code written against ValueError keeps working); the
``visedit`` command prints ``error: <message>`` and exits with status 2 for any of them. A message names
the file, and where there is one the record index and the field, so a user can find the bad byte.

- `DataError`: an MMEdit record, an image, ``truth.json`` — data a user downloads.
- `ArtifactError`: a file the toolkit wrote and reads back (attribution artifact, adapter weights,
  training state, ``manifest.json``, results files) that is missing, corrupt, or made for another backbone,
  placement or run.
- `OutputBusy`: another run holds the output folder's lock.
- `TrainingDiverged`: a loss became NaN or infinite; the message names the step, batch and loss term.
"""
from __future__ import annotations


class VisEditError(ValueError):
    """Base of the toolkit's errors; the message is one line naming file, record and field."""


class DataError(VisEditError):
    """A bad record, image or data file; the message is one line naming file, record and field."""


class ArtifactError(VisEditError):
    """A missing, corrupt or mismatched file the toolkit wrote (artifact, weights, state, results)."""


class OutputBusy(VisEditError):
    """Another run holds the lock of the output folder."""


class TrainingDiverged(VisEditError):
    """A training loss became NaN or infinite (step, batch and loss term named)."""
