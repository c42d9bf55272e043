"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field.

    Attributes keep the parts separately so that `on_error=skip` can report them.
    """

    def __init__(self, message: str, *, source: str | None = None, record: str | None = None,
                 field: str | None = None):
        self.problem = message
        self.source = source
        self.record = record
        self.field = field
        parts = [p for p in (source, record, f"field '{field}'" if field else None) if p]
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)

    def located(self, source: str | None = None, record: str | None = None) -> "DataError":
        """The same error with the file and/or record filled in where they were unknown."""
        return DataError(self.problem, source=self.source or source, record=self.record or record,
                         field=self.field)


class MissingDependencyError(DataError, ImportError):
    """A source needs an optional package (e.g. gcsfs for gs://). Both a DataError (so a CLI reports it in
    one line like other data problems) and an ImportError (what it is)."""
