"""The inbox's edges (issue 31 item 8): reads that cannot be steered outside the inbox by a racing
link, renames that are not cached twice, unreadable files, corrupt failure records, bounded sensor
ticks, advice that names what non-text bytes look like, and file names printed safely."""

import os
import threading

from sae_platform.corpus import list_source, read_documents
from sae_platform.errors import SourceError


def test_a_folder_flipped_to_a_link_while_opening_never_reads_outside(tmp_path):
    """A thread swaps a folder on the file's path for a link to a folder outside the inbox, and back,
    while the reader opens the file over and over: no read may return the outside file."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    (inbox / "sub" / "a.txt").write_text("inside text")
    (outside / "sub" / "a.txt").write_text("SECRET outside")
    (text_file,) = list_source(str(inbox / "**" / "*.txt"))
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            os.rename(inbox / "sub", inbox / "sub.real")
            os.symlink(outside / "sub", inbox / "sub")
            os.unlink(inbox / "sub")
            os.rename(inbox / "sub.real", inbox / "sub")

    flipper = threading.Thread(target=flip)
    flipper.start()
    texts = []
    try:
        for _ in range(3000):
            try:
                texts.append(read_documents(text_file)[0].text)
            except SourceError:
                texts.append(None)  # refused or vanished meanwhile: never a read outside
    finally:
        stop.set()
        flipper.join()
    assert texts.count("SECRET outside") == 0
    assert texts.count("inside text") > 0
