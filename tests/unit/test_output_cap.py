"""A task's streamed output past the node's cap: a marker, then the end of each stream."""

from __future__ import annotations

from shoal._output import chunk_bytes, output_chunk
from shoal.node.output import PIECE, OutputCap
from shoal.v1 import task_pb2

OUT, ERR = task_pb2.OUTPUT_STREAM_STDOUT, task_pb2.OUTPUT_STREAM_STDERR


def chunk(data: str, stream: int = OUT) -> task_pb2.OutputChunk:
    return task_pb2.OutputChunk(stream=stream, data=data)  # type: ignore[arg-type]


def test_output_under_the_cap_passes_as_it_is() -> None:
    sent: list[task_pb2.OutputChunk] = []
    cap = OutputCap(sent.append, limit=100, tail=10)
    cap(chunk("hello\n"))
    cap(chunk("oops\n", ERR))
    cap.close()
    assert [(c.stream, c.data) for c in sent] == [(OUT, "hello\n"), (ERR, "oops\n")]


def test_past_the_cap_a_marker_then_each_streams_tail() -> None:
    sent: list[task_pb2.OutputChunk] = []
    cap = OutputCap(sent.append, limit=10, tail=4)
    cap(chunk("0123456789abcdef"))
    cap(chunk("ERROR-1234", ERR))
    cap(chunk("ghij"))
    cap.close()
    stdout = "".join(c.data for c in sent if c.stream == OUT)
    stderr = "".join(c.data for c in sent if c.stream == ERR)
    assert stdout.startswith("0123456789\n[shoal: 6 bytes of output cut here")
    assert stdout.endswith("]\nghij")
    assert "[shoal: 6 bytes of output cut here" in stderr and stderr.endswith("1234")


def test_large_chunks_are_split_and_multibyte_text_is_cut_whole() -> None:
    sent: list[task_pb2.OutputChunk] = []
    cap = OutputCap(sent.append, limit=3 * PIECE, tail=8)
    cap(chunk("x" * (2 * PIECE + 5)))
    assert max(len(c.data) for c in sent) <= PIECE
    cap(chunk("é" * PIECE))  # 2 bytes each: cut on a character, never inside one
    cap.close()
    text = "".join(c.data for c in sent)
    assert text.count("x") == 2 * PIECE + 5
    assert "\ufffd" not in text


def test_bytes_that_are_not_utf8_are_capped_and_kept_exactly() -> None:
    sent: list[task_pb2.OutputChunk] = []
    cap = OutputCap(sent.append, limit=300, tail=100)
    data = bytes(range(256)) * 4 + "é".encode()  # 1024 bytes, then one 2-byte character
    cap(output_chunk(OUT, data[:200].decode(errors="surrogateescape")))  # under the cap
    cap(output_chunk(OUT, data[200:].decode(errors="surrogateescape")))
    cap.close()

    assert chunk_bytes(sent[0]) == data[:200] and sent[0].raw == data[:200]
    streamed = b"".join(chunk_bytes(c) for c in sent)
    head, marker, tail = streamed.partition(b"\n[shoal: ")
    assert head == data[:300]
    # The last 100 characters: a stray byte is one, and so is "é".
    assert marker and tail.endswith(b"]\n" + data[-101:])
    assert f"{len(data) - 300 - 101} bytes of output cut".encode() in tail
    assert all("\ufffd" not in c.data or c.raw for c in sent)  # the text view marks stray bytes
