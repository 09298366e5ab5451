"""One exception family that mirrors AWS's errors.

Raise the specific kind where the rule lives; render it once at the boundary:
the control plane turns an :class:`AwsError` into the REST error botocore parses
(status, ``x-amzn-ErrorType``, ``{"message": ...}``), the fleet provisioning
service turns a :class:`ProvisioningError` into the MQTT ``rejected`` payload
(``statusCode``, ``errorCode``, ``errorMessage``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class AwsError(Exception):
    """An error AWS's control plane would return.

    ``code`` must equal botocore's modeled shape name so that
    ``client.exceptions.<code>`` is raised on the client side. ``extra`` holds
    modeled members such as ``resourceId`` and ``resourceArn``.
    """

    code: ClassVar[str] = "InternalFailureException"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra: dict[str, Any] = extra

    def to_body(self) -> dict[str, Any]:
        """The JSON body of the REST error."""
        return {"message": self.message, **self.extra}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


def _kind(code: str, status: int) -> type[AwsError]:
    return type(code, (AwsError,), {"code": code, "status": status, "__module__": __name__})


InvalidRequestException = _kind("InvalidRequestException", 400)
ResourceNotFoundException = _kind("ResourceNotFoundException", 404)
ResourceAlreadyExistsException = _kind("ResourceAlreadyExistsException", 409)
DeleteConflictException = _kind("DeleteConflictException", 409)
CertificateStateException = _kind("CertificateStateException", 406)
CertificateValidationException = _kind("CertificateValidationException", 400)
CertificateConflictException = _kind("CertificateConflictException", 409)
RegistrationCodeValidationException = _kind("RegistrationCodeValidationException", 400)
MalformedPolicyException = _kind("MalformedPolicyException", 400)
VersionsLimitExceededException = _kind("VersionsLimitExceededException", 409)
VersionConflictException = _kind("VersionConflictException", 409)
LimitExceededException = _kind("LimitExceededException", 410)
ThrottlingException = _kind("ThrottlingException", 400)
UnauthorizedException = _kind("UnauthorizedException", 401)
ConflictingResourceUpdateException = _kind("ConflictingResourceUpdateException", 409)
ServiceUnavailableException = _kind("ServiceUnavailableException", 503)
InternalFailureException = _kind("InternalFailureException", 500)
ResourceRegistrationFailureException = _kind("ResourceRegistrationFailureException", 400)

ERROR_KINDS: dict[str, type[AwsError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestException,
        ResourceNotFoundException,
        ResourceAlreadyExistsException,
        DeleteConflictException,
        CertificateStateException,
        CertificateValidationException,
        CertificateConflictException,
        RegistrationCodeValidationException,
        MalformedPolicyException,
        VersionsLimitExceededException,
        VersionConflictException,
        LimitExceededException,
        ThrottlingException,
        UnauthorizedException,
        ConflictingResourceUpdateException,
        ServiceUnavailableException,
        InternalFailureException,
        ResourceRegistrationFailureException,
    )
}


class ProvisioningError(Exception):
    """A fleet provisioning MQTT API rejection (the ``rejected`` topic payload).

    Spec: fleet-provisioning.md §1.5. ``status_code`` is AWS's ``statusCode``,
    ``error_code`` its ``errorCode``, ``message`` its ``errorMessage``.
    """

    def __init__(self, status_code: int, error_code: str, message: str) -> None:
        super().__init__(f"{status_code} {error_code}: {message}")
        self.status_code = status_code
        self.error_code = error_code
        self.message = message

    def to_payload(self) -> dict[str, Any]:
        return {
            "statusCode": self.status_code,
            "errorCode": self.error_code,
            "errorMessage": self.message,
        }
