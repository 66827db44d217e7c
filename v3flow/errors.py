"""The few exception types v3flow raises; each message says what, where and what to do."""


class V3flowError(Exception):
    """Base of every error v3flow reports to a user (the CLI prints it without a traceback)."""


class ConfigError(V3flowError):
    """The config is invalid: raised before any work starts."""


class DataError(V3flowError):
    """A data source or a stage input is missing or unusable."""


class ServerError(V3flowError):
    """A local Prefect or MLflow server could not be started or reached."""
