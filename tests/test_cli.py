"""Every script's --help runs, and every option it lists says its default."""
import re

import pytest

from conftest import run_script

SCRIPTS = ['train.py', 'sample.py', 'convert.py', 'bench.py', 'shapes.py', 'evaluate.py']


def shapes_commands():
    """The subcommands of shapes.py, read off its usage line ({make-text-encoder,show,...})."""
    proc = run_script('shapes.py', '--help')
    return re.search(r'\{([\w,-]+)\}', proc.stdout).group(1).split(',')


def option_entries(help_text):
    """{flag line: its whole help text} for each option of an argparse help text.

    An entry starts at a line indented by two spaces and a dash, after the usage and the
    description, and runs on over the lines indented deeper; argparse wraps on spaces, so
    joining the lines keeps words such as "default" whole."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if re.match(r'(options|optional arguments|positional arguments):', line))
    entries, current = {}, None
    for line in lines[start:]:
        if re.match(r'  -', line):
            current = line.strip()
            entries[current] = current
        elif current and line.startswith('   '):
            entries[current] += ' ' + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize('args', [[script] for script in SCRIPTS] + [['shapes.py', c] for c in shapes_commands()],
                         ids=' '.join)
def test_help_shows_every_default(args):
    proc = run_script(*args, '--help', timeout=120)
    assert proc.returncode == 0, proc.stderr
    entries = option_entries(proc.stdout)
    assert entries, proc.stdout
    missing = [flag for flag, text in entries.items() if not flag.startswith('-h, --help') and 'default' not in text]
    assert not missing, f"{' '.join(args)} --help: options without a default: {missing}"


def test_help_parser_reads_wrapped_entries():
    text = ('usage: x [-h] [--a A]\n\ndescription\n  --not-an-option in the description\n\noptions:\n'
            '  -h, --help  show this help message and exit\n  --a A       first line\n'
            '              (default:\n              3)\n  --b         no default here\n')
    assert list(option_entries(text).values()) == ['-h, --help  show this help message and exit',
                                                   '--a A       first line (default: 3)',
                                                   '--b         no default here']
