"""The one error family the CLI turns into a single line on stderr."""


class FlashError(Exception):
    """A user-facing error: bad input, a bad file, a missing model. Never a bug."""


class CheckpointError(FlashError):
    """A Hugging Face checkpoint directory that cannot be read."""


class FormatError(FlashError):
    """A flash model directory whose files disagree with docs/FORMAT.md.

    The message names the file, the field and the fix.
    """

    def __init__(self, file: str, field: str, problem: str, fix: str | None = None):
        fix = fix or "re-run `mlx-flash convert` on the source checkpoint"
        super().__init__(f"{file}: {field}: {problem}; {fix}")
        self.file, self.field = file, field
