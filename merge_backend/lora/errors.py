"""The one error the LoRA code raises."""


class LoraError(ValueError):
    """A LoRA that cannot be used; the message names the file and the module or key."""
