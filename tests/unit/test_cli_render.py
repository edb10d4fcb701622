"""What the CLI sends to a terminal of what tasks and nodes say."""

from shoal.cli.render import plain, visible


def test_control_characters_are_shown_not_acted_on() -> None:
    said = "ok\x1b]0;title\x07\x1b[2J\x9b\rend\nnext\tcell"
    assert visible(said) == "ok\\x1b]0;title\\x07\\x1b[2J\\x9b\\x0dend\nnext\tcell"
    assert plain(said)[0].plain == visible(said)


def test_a_tasks_output_keeps_its_colours_and_carriage_returns() -> None:
    output = "\x1b[1;31mred\x1b[0m 50%\r100%\x1b]52;c;Y2xpcA==\x07"
    assert visible(output, output=True) == "\x1b[1;31mred\x1b[0m 50%\r100%\\x1b]52;c;Y2xpcA==\\x07"
