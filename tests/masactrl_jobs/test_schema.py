"""Schema rules that are not plain field constraints: error codes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from masactrl_jobs.schema import ErrorCode, JobError


def test_job_error_codes_come_from_the_enum_and_serialize_as_strings() -> None:
    error = JobError.model_validate({"code": "out_of_memory", "message": "Try a smaller size."})
    assert error.code == ErrorCode.out_of_memory
    assert error.model_dump(mode="json") == {
        "code": "out_of_memory",
        "message": "Try a smaller size.",
    }
    assert JobError.model_json_schema()["properties"]["code"] == {"title": "Code", "type": "string"}
    with pytest.raises(ValidationError, match="not a valid ErrorCode"):
        JobError(code="exploded", message="?")
