"""The project's data exception: bad input that a user can fix, reported as one line."""


class DataError(Exception):
    """A corpus, shard or tokenizer problem; the message is meant to be shown as is."""


class IndexedDatasetError(DataError):
    """A .bin/.idx pair that is missing, malformed or inconsistent."""
