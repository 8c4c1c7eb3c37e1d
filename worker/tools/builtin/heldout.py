"""Code prompts for the built-in model from standard-library modules held out of its training (the
`eval_modules` of its training report: argparse, csv, gettext, pickle, subprocess, tracemalloc,
xml.etree.ElementTree): the openings of functions, written out so that every machine has the same
bytes. The acceptance tests and the CPU benchmark run them."""

HELD_OUT_PROMPTS = (
    "    def add_argument_group(self, *args, **kwargs):\n        group = _ArgumentGroup(self, *args, **kwargs)\n",
    "def _expand_lang(loc):\n    import locale\n    loc = locale.normalize(loc)\n",
    ('    def compare_to(self, old_snapshot, key_type, cumulative=False):\n        """\n'
     "        Compute the differences with an old snapshot old_snapshot."),
    '    def findall(self, path, namespaces=None):\n        """Find all matching subelements by tag name or path.\n',
    ('def getstatusoutput(cmd, *, encoding=None, errors=None):\n    """Return (exitcode, output) of executing cmd in a '
     "shell.\n"),
    "    def save_tuple(self, obj):\n        if not obj: # tuple is empty\n            if self.bin:\n",
    "    def has_header(self, sample):\n        # Creates a dictionary of types of data in each column. If any\n",
    ("    def parse_known_args(self, args=None, namespace=None):\n        if args is None:\n"
     "            # args default to the system args\n"),
)
