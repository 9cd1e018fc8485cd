"""Trainer leases on the read store: renewals, lapses, and a woken-up stale trainer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.trainer.leases import LeaseBook
from shared.readmodel.sqlite import SQLiteReadStore


@pytest.fixture
def book(tmp_path: Path) -> LeaseBook:
    store = SQLiteReadStore(tmp_path / "read.sqlite")
    store.create_tables()
    return LeaseBook(store, lease_seconds=30)


def test_a_renewal_extends_the_lease_of_its_attempt(book: LeaseBook) -> None:
    book.renew("job", "trainer-a", 1)
    first = book.holder("job")
    time.sleep(0.01)
    book.renew("job", "trainer-a", 1)
    second = book.holder("job")
    assert first and second and second.expires_at > first.expires_at


def test_a_newer_attempt_takes_the_lease(book: LeaseBook) -> None:
    book.renew("job", "trainer-a", 1)
    book.renew("job", "trainer-b", 2)
    holder = book.holder("job")
    assert holder and (holder.worker, holder.attempt) == ("trainer-b", 2)


def test_a_stale_trainer_that_wakes_up_neither_steals_nor_drops_the_lease(book: LeaseBook) -> None:
    book.renew("job", "trainer-b", 2)
    book.renew("job", "trainer-a", 1)  # its heartbeat, after a long freeze
    book.release("job", "trainer-a", 1)  # its clean-up, once it sees its claim is lost
    holder = book.holder("job")
    assert holder and (holder.worker, holder.attempt) == ("trainer-b", 2)
    book.release("job", "trainer-b", 2)
    assert book.holder("job") is None


def test_leases_are_judged_by_the_databases_clock_not_the_hosts(
    book: LeaseBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # a renewer an hour behind
    book.renew("job", "trainer-a", 1)
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # a reaper an hour ahead
    holder = book.holder("job")
    assert holder is not None and not holder.expired
    assert abs(holder.expires_at - (real() + 30)) < 5


def test_a_lease_past_its_time_is_expired(tmp_path: Path) -> None:
    store = SQLiteReadStore(tmp_path / "read.sqlite")
    store.create_tables()
    short = LeaseBook(store, lease_seconds=-1.0)
    short.renew("job", "trainer-a", 1)
    holder = short.holder("job")
    assert holder is not None and holder.expired
