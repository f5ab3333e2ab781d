"""The output chunker (`shared.stream`), the gateway's handling of output frames, the agent's `output_on`,
and the new subjects and messages."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.agent import dispatch
from services.gateway.session import STREAM_BUDGET_CHARS, Publish, Session
from shared import subjects
from shared.errors import InvalidIdError, ProtocolError
from shared.ids import CommandId, GatewayId, HostId
from shared.protocol import (
    MAX_CHUNK_BYTES,
    ExecRequest,
    Hello,
    OutputChunk,
    OutputOn,
    Welcome,
    decode_agent_frame,
    decode_gateway_frame,
    encode,
)
from shared.stream import OutputStreamer

CID = CommandId("cmd-1")


class Sink:
    """Collects chunks; `slow` makes each send take that long (a slow WebSocket)."""

    def __init__(self, slow: float = 0.0, up: bool = True) -> None:
        self.chunks: list[OutputChunk] = []
        self.slow = slow
        self.up = up
        self.times: list[float] = []

    async def send(self, chunk: OutputChunk) -> bool:
        if self.slow:
            await asyncio.sleep(self.slow)
        if not self.up:
            return False
        self.chunks.append(chunk)
        self.times.append(asyncio.get_running_loop().time())
        return True

    def text(self, stream: str = "stdout") -> str:
        return "".join(c.data for c in self.chunks if c.stream == stream)


async def test_chunks_are_numbered_from_one_and_carry_every_byte() -> None:
    sink = Sink()
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    streamer.feed("stdout", b"a\n")
    streamer.feed("stderr", b"oops\n")
    await asyncio.sleep(0.05)
    streamer.feed("stdout", b"b\n")
    await streamer.close()
    assert [c.seq for c in sink.chunks] == list(range(1, len(sink.chunks) + 1))
    assert (sink.text("stdout"), sink.text("stderr")) == ("a\nb\n", "oops\n")
    assert not any(c.truncated for c in sink.chunks)


async def test_output_is_coalesced_within_the_interval() -> None:
    """1,000 small writes within one interval leave as one chunk, not 1,000."""
    sink = Sink()
    streamer = OutputStreamer(CID, sink.send, interval=0.2).start()
    streamer.feed("stdout", b"first\n")
    await asyncio.sleep(0.01)  # the first batch leaves at once
    for n in range(1000):
        streamer.feed("stdout", f"{n}\n".encode())
    await asyncio.sleep(0.05)
    assert len(sink.chunks) == 1  # the rest waits for the interval
    await streamer.close()
    assert len(sink.chunks) == 2
    assert sink.text() == "first\n" + "".join(f"{n}\n" for n in range(1000))


async def test_chunks_are_bounded_in_size() -> None:
    sink = Sink()
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    streamer.feed("stdout", b"x" * (100 * 1024))
    await streamer.close()
    assert all(len(c.data) <= MAX_CHUNK_BYTES for c in sink.chunks)
    assert len(sink.chunks) >= 7
    assert sink.text() == "x" * (100 * 1024)


async def test_past_the_budget_streaming_stops_truncated_and_a_slow_send_keeps_coalescing() -> None:
    """A chatty command behind a slow transport: sends stay few, bytes stay within the budget, the last
    chunk says truncated, and `feed` never blocks."""
    sink = Sink(slow=0.05)
    budget = 64 * 1024
    streamer = OutputStreamer(CID, sink.send, interval=0.01, budget=budget).start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(5000):  # 5000 × 1 KiB = 5 MB offered
        streamer.feed("stdout", b"y" * 1024)
    assert loop.time() - began < 0.5  # feeding never waited on the transport
    await streamer.close()
    sent = sum(len(c.data) for c in sink.chunks)
    assert sent == budget
    assert sink.chunks[-1].truncated
    assert [c.seq for c in sink.chunks] == list(range(1, len(sink.chunks) + 1))
    streamer.feed("stdout", b"more")  # after the budget: ignored
    assert sum(len(c.data) for c in sink.chunks) == budget


async def test_a_chunk_that_cannot_leave_uses_no_number() -> None:
    sink = Sink(up=False)
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    streamer.feed("stdout", b"lost\n")
    await asyncio.sleep(0.05)
    sink.up = True
    streamer.feed("stdout", b"kept\n")
    await streamer.close()
    assert [(c.seq, c.data) for c in sink.chunks] == [(1, "kept\n")]


async def test_a_character_split_across_reads_is_not_mangled() -> None:
    sink = Sink()
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    encoded = "héllo wörld ✓\n".encode()
    for i in range(len(encoded)):
        streamer.feed("stdout", encoded[i : i + 1])
        await asyncio.sleep(0.002)
    await streamer.close()
    assert sink.text() == "héllo wörld ✓\n"


async def test_abort_stops_at_once() -> None:
    sink = Sink(slow=10)
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    streamer.feed("stdout", b"x")
    await asyncio.sleep(0.05)
    async with asyncio.timeout(1):
        await streamer.abort()
    assert sink.chunks == []


async def test_close_is_bounded_when_the_transport_hangs() -> None:
    sink = Sink(slow=10)
    streamer = OutputStreamer(CID, sink.send, interval=0.01).start()
    streamer.feed("stdout", b"x")
    async with asyncio.timeout(2):
        await streamer.close(wait=0.2)


# ----------------------------------------------------------------------------- protocol and subjects


def test_output_frames_round_trip_and_are_bounded() -> None:
    chunk = OutputChunk(command_id=CID, seq=3, stream="stderr", data="x", truncated=True)
    assert decode_agent_frame(encode(chunk)) == chunk
    on = OutputOn(max_chunk_bytes=MAX_CHUNK_BYTES)
    assert decode_gateway_frame(encode(on)) == on
    for bad in (
        {"seq": 0},
        {"stream": "stdin"},
        {"data": "x" * (MAX_CHUNK_BYTES + 1)},
        {"command_id": "no spaces"},
    ):
        fields = {"type": "output", "v": 1, "command_id": "c", "seq": 1, "stream": "stdout", **bad}
        with pytest.raises(ProtocolError):
            decode_agent_frame(json.dumps(fields))


def test_output_subject_is_built_and_parsed() -> None:
    subject = subjects.output("web-1", "cmd-1")
    assert subject == "warlock.output.web-1.cmd-1"
    assert subjects.parse_output(subject) == ("web-1", "cmd-1")
    for bad in ("warlock.output.web-1", "warlock.output.WEB.cmd", "warlock.result.web-1.cmd-1"):
        with pytest.raises(InvalidIdError):
            subjects.parse_output(bad)
    with pytest.raises(InvalidIdError):
        subjects.output("web-1", "a.b")


# ----------------------------------------------------------------------------- gateway session


def session(capabilities: tuple[str, ...]) -> Session[object]:
    hello = Hello(
        host_id=HostId("web-1"), hostname="h", platform="p", agent_version="1", capabilities=capabilities
    )
    return Session(object(), hello, GatewayId("gw-1"), connected_at=1.0, last_seen=1.0)


def test_output_on_goes_only_to_agents_that_announce_it() -> None:
    assert session(("exec",)).output_on() is None
    assert session(("exec", "output_stream")).output_on() == OutputOn(max_chunk_bytes=MAX_CHUNK_BYTES)


async def test_the_gateway_publishes_chunks_of_commands_in_flight_within_the_budget() -> None:
    s = session(("output_stream",))
    stray = OutputChunk(command_id=CID, seq=1, stream="stdout", data="x")
    assert s.handle(stray) == []  # not in flight here: dropped
    s.admit_exec(ExecRequest(command="yes", command_id=CID), msg=object(), max_in_flight=8)  # type: ignore[arg-type]
    actions = s.handle(stray)
    assert actions == [Publish(subjects.output("web-1", CID), stray)]
    big = "z" * MAX_CHUNK_BYTES
    published = 1
    for seq in range(2, 200):
        if s.handle(OutputChunk(command_id=CID, seq=seq, stream="stdout", data=big)):
            published += len(big)
    assert published <= STREAM_BUDGET_CHARS  # an agent ignoring its budget is cut off here


def test_the_agent_streams_only_after_output_on() -> None:
    welcome = Welcome(
        session_id="s" * 16, gateway_id=GatewayId("gw-1"), ping_interval=10, max_result_bytes=4096
    )
    state = dispatch.SessionState(welcome=welcome, last_received=0.0)
    assert not state.output_stream
    assert dispatch.on_frame(state, encode(OutputOn(max_chunk_bytes=1024)), 1.0) == []
    assert state.output_stream
    assert "output_stream" in dispatch.CAPABILITIES
