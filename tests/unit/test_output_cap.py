"""A task's streamed output past the node's cap: a marker, then the end of each stream."""

from __future__ import annotations

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
