"""CNI error codes (SPEC section 5, "Error") and the one exception type that carries them."""

from __future__ import annotations

import json

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
INVALID_NETNS = 8
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999

# Plugin-specific codes (SPEC: 100 and up), numbered here so no two mean different things.
EXHAUSTED = 110  # pyipam: no free IP in a range set
IP_UNAVAILABLE = 111  # pyipam: the requested IP is taken or outside the ranges
DUPLICATE_ALLOCATION = 112  # pyipam: the attachment already holds an IP in that range set
NOT_FOUND = 113  # pyipam: CHECK found no reservation for the attachment
MASQ_FAILED = 120  # pybridge: the masquerade rules could not be set up
SOURCE_CHECK_FAILED = 121  # pybridge: the source check rules could not be set up (sourceCheck)


class CNIError(Exception):
    """An error the plugin reports to the runtime as a spec error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> str:
        body: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            body["details"] = self.details
        return json.dumps(body)

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg
