"""pgmux.auth: who may log in, with which secret.

Sans-I/O: auth_file parsing, secret classification and md5 hashing, SCRAM-SHA-256 exchanges in both roles.
"""

from pgmux.auth.authfile import AuthFile, AuthFileError, load_auth_file, parse_auth_file
from pgmux.auth.scram import ScramClient, ScramError, ScramServer
from pgmux.auth.secrets import (
    CacheStats,
    ScramSecret,
    SecretKind,
    clear_salted_password_cache,
    md5_client_response,
    md5_secret,
    md5_verify,
    plain_verify,
    salted_password,
    salted_password_cache_stats,
    secret_kind,
)

__all__ = [
    "AuthFile",
    "AuthFileError",
    "CacheStats",
    "ScramClient",
    "ScramError",
    "ScramSecret",
    "ScramServer",
    "SecretKind",
    "clear_salted_password_cache",
    "load_auth_file",
    "md5_client_response",
    "md5_secret",
    "md5_verify",
    "parse_auth_file",
    "plain_verify",
    "salted_password",
    "salted_password_cache_stats",
    "secret_kind",
]
