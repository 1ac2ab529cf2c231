"""Schemathesis against the live `medsearch serve` on loopback, with and without a token.

Every generated request (from the server's own /openapi.json, all phases and checks): no 5xx,
documented status codes, content types and response shapes, schema-invalid requests refused,
schema-valid ones accepted (or refused for their content only, benchmarks/api_fuzz_checks.py),
the token never ignored. Bounded in time here; `benchmarks/api_fuzz.py` runs it longer.
MEDSEARCH_FUZZ_SECONDS and MEDSEARCH_FUZZ_SEED change the budget and the seed.
"""

from __future__ import annotations

import os
import shutil

import httpx
import jsonschema_rs
import pytest

from benchmarks.api_fuzz import TOKEN, fuzz, serving

from ..conftest import PYDICOM_TEST_FILES, write_images
from ..serving import index_store

SECONDS = float(os.environ.get("MEDSEARCH_FUZZ_SECONDS", "10"))
SEED = int(os.environ.get("MEDSEARCH_FUZZ_SEED", "13"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fuzz")
    write_images(root / "images", 6, seed=3)
    shutil.copy(PYDICOM_TEST_FILES / "CT_small.dcm", root / "images")
    index_store(root / "store", root / "images", tiny_model)
    return root / "store"


@pytest.fixture(scope="module")
def servers(store):
    """`medsearch serve` on the store twice, without and with a token, started side by side."""
    with serving(store, None, TOKEN) as (open_url, guarded_url):
        yield {None: open_url, TOKEN: guarded_url}


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_schemathesis_finds_nothing(servers, token):
    result = fuzz(servers[token], token, SECONDS, SEED)
    assert result["operations_tested"] == 18
    assert result["cases"] > 50, result
    assert result["unique_failures"] == 0 and result["errored"] == 0, result["output_tail"]


def test_schema_states_what_is_required(servers):
    """What schemathesis first found: `{}` allowed by the schema for /search, /export and
    /classify, and a boolean taken for a number. The schema now refuses what the server does."""
    schema = httpx.get(f"{servers[None]}/openapi.json").json()

    def valid(name: str, body) -> bool:
        validator = jsonschema_rs.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": schema["components"]})
        return validator.is_valid(body)

    for name in ("SearchBody", "ExportBody", "ClassifyBody", "SimilarBody"):
        assert not valid(name, {}), name
    assert valid("SearchBody", {"query": "effusion"})
    assert valid("SearchBody", {"terms": [{"text": "effusion"}, {"id": 3, "weight": -1}]})
    for body in ({"query": "a", "terms": [{"text": "b"}]}, {"query": "   "}, {"query": None},
                 {"query": "a", "min_score": False}, {"query": "a", "k": True},
                 {"terms": []}, {"terms": [{"text": "a", "id": 1}]}, {"terms": [{"id": 2 ** 63}]},
                 {"query": "a", "filters": {"path_glob": "*" * 65}}):
        assert not valid("SearchBody", body), body
    assert valid("ExportBody", {"id": 1, "query": "- tube"})
    assert not valid("ExportBody", {"id": 1, "terms": [{"text": "a"}]})
    assert valid("ClassifyBody", {"id": 1, "preset": "cxr"})
    assert not valid("ClassifyBody", {"id": 1, "labels": ["a,b", "c"]})
    assert not valid("ClassifyBody", {"id": 1, "labels": ["a", "b"], "preset": "cxr"})
    error = schema["paths"]["/search"]["post"]["responses"]["422"]["content"]["application/json"]
    assert error["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
