"""Jobs' pure rules: batch sizes, batches, label selectors, counts."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from services.api.fleet.jobs import JobSpec, batch_size, batches
from services.api.http.routes.jobs import JobBody, counts_of, parse_label_selectors
from services.api.store.jobs import labels_match


@pytest.mark.parametrize(
    ("batch", "total", "size"),
    [
        (None, 7, 7),
        (3, 7, 3),
        (10, 7, 7),
        ("10%", 1000, 100),
        ("10%", 5, 1),  # at least 1
        ("50%", 5, 2),  # rounded down
        ("100%", 5, 5),
        (1, 0, 0),
    ],
)
def test_batch_size(batch: int | str | None, total: int, size: int) -> None:
    assert batch_size(batch, total) == size


def test_batches_cut_in_order() -> None:
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert batches([1, 2], 5) == [[1, 2]]
    assert batches([], 3) == []


def test_labels_match_all_selectors() -> None:
    labels = {"role": "web", "env": "prod"}
    assert labels_match(labels, [("role", "web")])
    assert labels_match(labels, [("role", "web"), ("env", "prod")])
    assert labels_match(labels, [("env", None)])
    assert not labels_match(labels, [("role", "web"), ("env", "test")])
    assert not labels_match(labels, [("zone", None)])
    assert not labels_match(None, [("role", None)])
    assert labels_match({}, [])
    assert not labels_match({"role": "web"}, [("role", "")])  # an empty value is a value
    assert labels_match({"role": ""}, [("role", "")])


def test_label_selectors_parse_and_refuse() -> None:
    assert parse_label_selectors(["role=web", "env", "a=b=c", "k="]) == [
        ("role", "web"),
        ("env", None),
        ("a", "b=c"),
        ("k", ""),
    ]
    for bad in ("", "=web", "k" * 64, "k=" + "v" * 256):
        with pytest.raises(RequestValidationError) as caught:
            parse_label_selectors([bad])
        assert caught.value.errors()[0]["loc"] == ("query", "label")


def test_job_body_targets_and_batch() -> None:
    body = JobBody.model_validate({"command": "true", "targets": {"labels": {"role": "web"}}, "batch": "10%"})
    assert body.batch == "10%"
    assert JobBody.model_validate({"command": "x", "targets": {"all": True}, "batch": 3}).batch == 3
    for bad in (
        {"command": "x", "targets": {"all": True}, "batch": True},
        {"command": "x", "targets": {"all": True}, "batch": 2.5},
        {"command": "x", "targets": {"all": True}, "batch": "101%"},
        {"command": "x", "targets": {"hosts": []}},
        {"command": "x", "targets": {"labels": {}}},
        {"command": "x", "targets": {"hosts": ["a"], "labels": {"k": "v"}}},
    ):
        with pytest.raises(ValueError, match="validation error"):
            JobBody.model_validate(bad)


def test_counts_group_statuses() -> None:
    counts = counts_of({"succeeded": 3, "undeliverable": 2, "queued": 4, "pending": 1, "skipped": 5})
    assert (counts.succeeded, counts.unreachable, counts.pending, counts.skipped) == (3, 2, 5, 5)


def test_spec_keeps_the_selection_as_asked() -> None:
    assert JobSpec("x", 1, hosts=["a"]).selection() == {"hosts": ["a"]}
    assert JobSpec("x", 1, labels={"k": "v"}).selection() == {"labels": {"k": "v"}}
    assert JobSpec("x", 1, all_hosts=True).selection() == {"all": True}
