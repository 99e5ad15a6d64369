"""Progress bars: tqdm's own on a terminal, plain periodic lines in a log."""

import io

from delta_steering.progress import tqdm


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_log_nested_bars_write_plain_lines_only():
    log = io.StringIO()
    for _ in tqdm(range(4), desc="outer", file=log, mininterval=0, miniters=1):
        for _ in tqdm(range(3), desc="inner", leave=False, file=log):
            pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(line.startswith("outer:") for line in lines)  # quick inner bars that do not stay write nothing
    assert [line.split("|")[-1].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4", "4/4"]


def test_in_a_log_a_bar_writes_at_most_one_line_per_interval_and_one_at_the_end():
    log = io.StringIO()
    for _ in tqdm(range(1000), desc="work", file=log):
        pass
    assert log.getvalue().count("\n") == 1 and "1000/1000" in log.getvalue()


def test_on_a_terminal_the_bar_redraws_in_place():
    screen = Terminal()
    for _ in tqdm(range(3), desc="work", file=screen, mininterval=0):
        pass
    assert "\r" in screen.getvalue()
