"""Classify a folder of any size in bounded memory, resumably: the engine of `predict_new.py`.

Photos are found lazily (predict.iter_images), decoded a batch at a time by a
few worker processes, classified batch by batch, and each batch's rows are
appended to the CSV in one write followed by fsync. Only a few batches are in
flight and only the photos the figure shows are kept, so memory stays flat
whatever the folder's size. A killed run leaves complete rows (a partial last
line, from a kill in mid-write, is cut off on resume), and a resumed run skips
the photos the CSV already lists, so it ends with the CSV an uninterrupted run
writes. Nothing here imports pandas, matplotlib or Keras: it runs in the
serving environment (requirements-serve.txt) on an exported model.
"""

import collections
import concurrent.futures
import contextlib
import csv
import io
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from imgcls.dataset import atomic_path
from imgcls.errors import UserError
from imgcls.images import BadImage
from imgcls.predict import Classifier, decode_for_model, iter_images

# Batches decoded ahead of the model, per worker: enough to keep it busy, few enough to bound memory.
BATCHES_AHEAD_PER_WORKER = 2


def csv_columns(top_k: int) -> list[str]:
    ranks = [f"top{rank}_{part}" for rank in range(1, top_k + 1) for part in ("class", "probability")]
    return ["image", "true_label", "predicted", "confidence", "unknown", "best_guess", *ranks, "error"]


# ----- Decoding in worker processes -----

_card = {}  # set once per worker process by _start_worker


def _start_worker(card: dict) -> None:
    _card.update(card)
    # Ctrl-C reaches every process of the terminal: the main process alone stops the run, and these with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # A main process that is killed (SIGKILL, out of memory) cannot stop its workers: have the kernel do it.
        import ctypes

        set_parent_death_signal = 1  # PR_SET_PDEATHSIG, from <linux/prctl.h>
        ctypes.CDLL(None).prctl(set_parent_death_signal, signal.SIGKILL)


def _reason(error: Exception) -> str:
    if isinstance(error, BadImage):
        return str(error)
    if isinstance(error, OSError):  # unreadable file: permissions, a vanished file
        return f"cannot read: {error.strerror or error}"
    # A decoder's own bug on one odd file must not stop a run of 100,000: that file gets the reason.
    return f"cannot decode: {type(error).__name__}: {error}"


def _decode_batch(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """The readable photos' pixels, stacked, and for every file "" or why it is not usable."""
    pixels, reasons = [], []
    for path in paths:
        try:
            pixels.append(decode_for_model(path, _card))
            reasons.append("")
        except Exception as error:  # every failure becomes the file's row (see _reason)
            reasons.append(_reason(error))
    size = int(_card["image_size"])
    return (np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)), reasons


@contextlib.contextmanager
def decoding_workers(card: dict, workers: int):
    """Worker processes that decode photos the card's way.

    Fresh interpreters (spawn), not copies of this one: they hold neither the model
    nor its runtime's threads, so they stay small and fork no half-held lock.
    """
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(card,))
    try:
        yield executor
    finally:
        # A stopped run drops the batches no worker has started, and waits for the few that one has: a
        # shutdown without waiting races the executor's own threads as the interpreter exits.
        executor.shutdown(cancel_futures=True)


# ----- The CSV, and what the figure and the closing line need -----

@dataclass
class Summary:
    """Counts of the rows so far, and the first readable photos for the figure (row, pixels or None)."""

    figure_limit: int
    rows: int = 0
    unreadable: int = 0
    unknown: int = 0
    labelled: int = 0
    right: int = 0
    shown: list = field(default_factory=list)

    def add(self, row: dict, pixels: np.ndarray | None = None) -> None:
        self.rows += 1
        if row["error"]:
            self.unreadable += 1
            return
        self.unknown += row["unknown"] == "True"
        if row["true_label"]:
            self.labelled += 1
            self.right += row["predicted"] == row["true_label"]
        if len(self.shown) < self.figure_limit:
            # A copy: a view would keep its whole batch alive.
            self.shown.append((row, None if pixels is None else pixels.copy()))

    def line(self) -> str:
        parts = [f"{self.rows - self.unreadable} classified", f"{self.unknown} unknown"]
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable")
        if self.labelled:
            parts.append(f"{self.right}/{self.labelled} labelled images right")
        return ", ".join(parts)


class PredictionTable:
    """The predictions CSV, appended a batch at a time. With `resume`, what an earlier run of it holds:
    the photos it lists (`done`) and their counts; otherwise it starts empty."""

    def __init__(self, path: Path, columns: list[str], figure_limit: int, resume: bool):
        self.path, self.columns = Path(path), columns
        self.summary = Summary(figure_limit)
        self.done: set[str] = set()
        self.resumed = resume and self.path.exists() and self._read_earlier_rows()
        self.file = None

    def _read_earlier_rows(self) -> bool:
        """Take in every complete row; cut a partial last one off. False if the file has no header yet."""
        kept, record, header = 0, b"", None
        with open(self.path, "rb") as file:
            for line in file:
                record += line
                # A record ends at a newline outside quotes (the csv module doubles quotes inside a field).
                if not line.endswith(b"\n") or record.count(b'"') % 2:
                    continue
                values = next(csv.reader(io.StringIO(record.decode(errors="surrogateescape"))))
                if header is None:
                    header = values
                    if header != self.columns:
                        raise UserError(
                            f"--resume: {self.path} has the columns {', '.join(header)}, not those of this run"
                            f" (top_k {sum(column.endswith('_class') for column in self.columns)}): resume with the"
                            " same --top-k, or rerun without --resume to start the CSV again.")
                elif len(values) == len(self.columns):
                    row = dict(zip(self.columns, values))
                    self.done.add(row["image"])
                    self.summary.add(row)
                else:
                    break
                kept += len(record)
                record = b""
        if kept < self.path.stat().st_size:
            print(f"{self.path}: cut off an incomplete last row (a run stopped in mid-write)", file=sys.stderr)
            os.truncate(self.path, kept)
        return header is not None

    def open(self) -> None:
        """Start appending; a new table first gets its header (atomically: the file is whole or absent)."""
        if not self.resumed:
            with atomic_path(self.path) as temporary:
                temporary.write_bytes(self._encode([dict(zip(self.columns, self.columns))]))
        self.file = open(self.path, "ab")

    def append(self, rows: list[dict], pixels: np.ndarray) -> None:
        """Write the rows in one write, flushed to the disk; `pixels` holds the readable ones', in order."""
        self.file.write(self._encode(rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        readable = iter(pixels)
        for row in rows:
            self.summary.add(row, None if row["error"] else next(readable))

    def close(self) -> None:
        if self.file:
            self.file.close()

    def _encode(self, rows: list[dict]) -> bytes:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")  # what pandas' to_csv writes
        writer.writerows([row[column] for column in self.columns] for row in rows)
        return text.getvalue().encode(errors="surrogateescape")


# ----- The run -----

def count_photos(inputs: list, class_names: list[str], done: set[str]) -> tuple[int, int]:
    """(files to classify, how many of them the CSV already lists): a first, cheap walk for the progress bar."""
    total = already = 0
    for path, _ in iter_images(inputs, class_names):
        total += 1
        already += str(path) in done
    return total, already


def rows_of(classifier: Classifier, files: list[tuple[Path, str]], pixels: np.ndarray, reasons: list[str]
            ) -> list[dict]:
    """One CSV row per file, every value as the text the CSV holds (floats as repr, as pandas writes them)."""
    predictions = iter(classifier.classify(pixels) if len(pixels) else [])
    rows = []
    for (path, label), reason in zip(files, reasons):
        row = dict.fromkeys(csv_columns(classifier.top_k), "") | {"image": str(path), "true_label": label,
                                                                 "error": reason}
        if not reason:
            prediction = next(predictions)
            row |= {"predicted": prediction.predicted, "confidence": repr(prediction.confidence),
                    "unknown": str(prediction.unknown), "best_guess": prediction.best_guess}
            for rank, (name, probability) in enumerate(prediction.top, start=1):
                row |= {f"top{rank}_class": name, f"top{rank}_probability": repr(probability)}
        rows.append(row)
    return rows


def classify_all(classifier: Classifier, decoders: concurrent.futures.Executor, workers: int, inputs: list,
                 table: PredictionTable, progress) -> None:
    """Classify every photo of `inputs` that `table` does not list yet, in order, appending to `table`."""
    photos = ((path, label) for path, label in iter_images(inputs, classifier.class_names)
              if str(path) not in table.done)
    batches = iter(lambda: list(islice(photos, classifier.batch_size)), [])
    in_flight = collections.deque()

    def finish_oldest():
        files, decoding = in_flight.popleft()
        try:
            pixels, reasons = decoding.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(f"a decoding process died (out of memory, or a decoder crashed) on one of {files[0][0]}"
                            f" .. {files[-1][0]}: {table.path} keeps the rows before them; move the bad file"
                            " away and rerun with --resume.") from None
        table.append(rows_of(classifier, files, pixels, reasons), pixels)
        progress.update(len(files))

    for files in batches:
        in_flight.append((files, decoders.submit(_decode_batch, [str(path) for path, _ in files])))
        if len(in_flight) > workers * BATCHES_AHEAD_PER_WORKER:
            finish_oldest()
    while in_flight:
        finish_oldest()


def photos_to_show(summary: Summary, card: dict) -> list[tuple[dict, np.ndarray]]:
    """The figure's photos: those of an earlier run (resumed) are decoded again; one that no longer decodes is left out."""
    shown = []
    for row, pixels in summary.shown:
        if pixels is None:
            try:
                pixels = decode_for_model(row["image"], card)
            except (BadImage, OSError):
                continue
        shown.append((row, pixels))
    return shown
