"""The one error type of inference and conversion: a message for the user, printed without a traceback."""


class InferenceError(Exception):
    pass
