"""How every benchmark's ``--help`` reads: each option's default after its help (argparse's
``ArgumentDefaultsHelpFormatter``), the description as the script's docstring writes it
(``RawDescriptionHelpFormatter``). An option whose default is None (decided when it runs, e.g. by
``--quick``: its help says how) and a flag (``store_true``) show none."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``formatter_class`` of every benchmark's ArgumentParser (tests/test_benchmarks_help.py checks it)."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)
