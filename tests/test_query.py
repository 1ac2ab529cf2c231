"""Query arithmetic: parsing, combining, and the same results through Searcher and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InputError
from retrieval.query import Term, combine, describe, parse_query
from retrieval.search import Searcher
from retrieval.store import Store

from .conftest import write_images
from .serving import cli, index_store


@pytest.mark.parametrize("text, expected", [
    ("pleural effusion", [Term("text", "pleural effusion", 1.0)]),
    ('"pleural effusion" - "chest tube"',
     [Term("text", "pleural effusion", 1.0), Term("text", "chest tube", -1.0)]),
    ('2:"effusion" + img.png', [Term("text", "effusion", 2.0), Term("file", "img.png", 1.0)]),
    ("x-ray of a T2-weighted scan", [Term("text", "x-ray of a T2-weighted scan", 1.0)]),
    ("crohn's disease + #12", [Term("text", "crohn's disease", 1.0), Term("id", 12, 1.0)]),
    ('- "tube" + 0.5:effusion', [Term("text", "tube", -1.0), Term("text", "effusion", 0.5)]),
    ('"a" -"b"', [Term("text", "a", 1.0), Term("text", "b", -1.0)]),
    ("@scans/query + scan.DCM", [Term("file", "scans/query", 1.0), Term("file", "scan.DCM", 1.0)]),
])
def test_parse(text, expected):
    assert parse_query(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   ", "empty"), ('"effusion" +', "ends with an operator"),
    ("a + - b", "two operators"), ('"unclosed', "unclosed"), ("0:a", "weight 0"),
    ('""', "empty"), (" + ".join(["a"] * 81), "at most 80"),
])
def test_parse_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_query(text)


def test_files_refused_where_not_allowed():
    with pytest.raises(InputError, match="names a file"):
        parse_query('"a" + /etc/passwd.png', allow_files=False)
    assert parse_query("#3 - tube", allow_files=False) == [Term("id", 3, 1.0), Term("text", "tube", -1.0)]


def test_describe_round_trips():
    terms = parse_query('2:"pleural effusion" - "chest tube" + #4')
    assert parse_query(describe(terms)) == terms


def test_combine_weights_and_renormalises():
    a, b = np.array([1, 0, 0], np.float32), np.array([0, 1, 0], np.float32)
    v = combine([(2.0, a), (-1.0, b)])
    assert np.allclose(v, np.array([2, -1, 0]) / np.sqrt(5), atol=1e-6)
    assert np.isclose(np.linalg.norm(v), 1.0)
    assert np.allclose(combine([(1.0, a * 3)]), a)  # terms count as unit vectors
    with pytest.raises(InputError, match="cancel"):
        combine([(1.0, a), (-1.0, a)])


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("query")
    write_images(root / "images", 8, seed=3)
    index_store(root / "store", root / "images", tiny_model)
    return root


def test_searcher_query_matches_single_searches(store, tiny_model):
    searcher = Searcher(Store.open(store / "store", readonly=True), str(tiny_model), "cpu")
    plain = searcher.query(parse_query("pleural effusion"), k=5)
    assert [r.to_json() for r in plain] == [r.to_json() for r in searcher.text("pleural effusion", k=5)]
    by_id = searcher.query(parse_query("#3"), k=5)
    assert [r.to_json() for r in by_id] == [r.to_json() for r in searcher.similar_id(3, k=5)]

    # "a" - 0.5:"b" ranks by cosine with normalise(t(a) - 0.5 t(b)), checked by brute force.
    terms = parse_query('"pleural effusion" - 0.5:"chest tube"')
    found = searcher.query(terms, k=8)
    a, b = searcher.text_vector("pleural effusion"), searcher.text_vector("chest tube")
    q = (a - 0.5 * b) / np.linalg.norm(a - 0.5 * b)
    ids, vectors = searcher.store.all_vectors()
    expected = ids[np.argsort(-(vectors @ q))][:8]
    assert [r.id for r in found] == [int(i) for i in expected]
    assert np.allclose([r.score for r in found], np.sort(vectors @ q)[::-1][:8], atol=1e-5)


def test_cli_search_arithmetic_with_an_image_file(store, tiny_model):
    image = sorted((store / "images").glob("*.png"))[0]
    common = ("--store", str(store / "store"), "-k", "3")
    own = cli("search", str(image), *common)["results"]
    assert own[0]["path"] == str(image.absolute()) and own[0]["score"] > 0.9999
    mixed = cli("search", f'{image} - 0.5:"chest tube"', *common)["results"]
    assert mixed[0]["path"] == str(image.absolute()) and mixed[0]["score"] < own[0]["score"]
    with pytest.raises(InputError, match="no such file"):
        cli("search", '"effusion" + missing.png', *common)
