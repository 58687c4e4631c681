"""`make serve`: the chosen model behind an HTTP API, with an upload page.

    python scripts/serve.py [--port 8000] [--host 127.0.0.1] [--model cnn|transfer|best|PATH]

PATH is a .keras model, or a file written by `export` (models/export/best.onnx or
.tflite, its .json card beside it). An exported file is served by onnxruntime or
LiteRT alone: TensorFlow, Keras and JAX are never imported (requirements-serve.txt
is all it needs).

  POST /predict   a photo (multipart field `file`, or the raw bytes with an image/* content type)
                  → {"predicted", "best_guess", "confidence", "unknown", "top_k": [{"class", "probability"}], ...}
  GET  /health    {"status": "ok", "model": ...}
  GET  /classes   {"classes": [...]}
  GET  /          a page to upload a photo and see its probability bars

The model (predict_new.model, top_k and min_confidence in params.yaml, so the API
answers like the predictions CSV) is loaded once (a .keras file in Keras' safe_mode).
Every bad request gets a 4xx JSON {"error": message}; nothing a client sends stops
the server. Environment variables override params.yaml, for containers:
PORT, HOST, MODEL, MIN_CONFIDENCE, MAX_UPLOAD_BYTES.
"""

import argparse
import asyncio
import concurrent.futures
import os
import queue
import threading
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from imgcls import device
from imgcls.errors import UserError, run_stage
from imgcls.images import BadImage
from imgcls.params import load_params
from imgcls.predict import MODEL_CHOICES, Classifier, choose_model

PAGE_FILE = Path(__file__).with_name("serve_page.html")
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_SLACK = 64 * 1024
# An oversized upload is read and thrown away up to this much more, so the client
# finishes sending and reads the 413 instead of a reset connection; beyond it we hang up.
DRAIN_LIMIT = 64 * 1024 * 1024
# Most photos classified in one step when requests arrive together.
SERVE_BATCH = 8
# Threads that decode uploaded photos, off the event loop. Decoding is CPU work, so more threads
# than cores gain nothing; and each thread that allocates gets a glibc malloc arena of its own,
# so a pool per request (Starlette's default, 40 threads) makes memory grow under load.
DECODE_THREADS = os.cpu_count() or 1


class Batcher:
    """Classifies photos from many requests together: requests that arrive while the
    model is busy wait and then go through it as one batch.

    On a CPU one batch of 8 costs much less than 8 batches of 1, so under concurrent load the
    server answers more requests per second and each waits less.
    """

    def __init__(self, classifier: Classifier, max_batch: int = 8):
        self.classifier = classifier
        self.max_batch = max_batch
        self.pending: queue.Queue = queue.Queue()
        for size in (1, 2, 4, 8):  # compile every batch shape now, not during the first requests
            if size <= max_batch:
                classifier.probabilities(np.zeros((size, classifier.image_size, classifier.image_size, 3), np.uint8))
        threading.Thread(target=self._work, name="batcher", daemon=True).start()

    def submit(self, pixels: np.ndarray) -> concurrent.futures.Future:
        """Queue one photo's pixels; the future's result is its Prediction."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.pending.put((pixels, future))
        return future

    def _work(self) -> None:
        while True:
            waiting = [self.pending.get()]
            while len(waiting) < self.max_batch:
                try:
                    waiting.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                predictions = self.classifier.classify(np.stack([pixels for pixels, _ in waiting]))
            except Exception as exception:  # reported to each waiting request; the worker lives on
                for _, future in waiting:
                    future.set_exception(exception)
                continue
            for (_, future), prediction in zip(waiting, predictions):
                future.set_result(prediction)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def bad_image_status(reason: str) -> int:
    # Not an image at all: unsupported media type. Empty, truncated, corrupt or a
    # decompression bomb: an image we understood but refuse to process.
    return 415 if reason.startswith("not an image") else 422


def create_app(classifier: Classifier, max_upload_bytes: int) -> FastAPI:
    """The API and its upload page around one loaded classifier; uploads over `max_upload_bytes` get a 413."""
    app = FastAPI(title="imgcls", summary=f"classifies photos into {len(classifier.class_names)} classes")
    batcher = Batcher(classifier, max_batch=classifier.batch_size)
    decoders = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    page = PAGE_FILE.read_text()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exception: HTTPException):
        return error(exception.status_code, str(exception.detail))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": classifier.name, "model_file": str(classifier.model_file),
                "classes": len(classifier.class_names), "top_k": classifier.top_k,
                "min_confidence": classifier.min_confidence, "max_upload_bytes": max_upload_bytes}

    @app.get("/classes")
    def classes():
        return {"classes": classifier.class_names}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.post("/predict")
    async def predict(request: Request):
        data, filename = await read_upload(request, max_upload_bytes)
        # Decoding and inference block: off the event loop, so /health stays responsive meanwhile.
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(decoders, classifier.decode, data)
        except BadImage as exception:
            return error(bad_image_status(str(exception)), f"{filename or 'upload'}: {exception}")
        prediction = await asyncio.wrap_future(batcher.submit(pixels))
        return {**prediction.as_json(), "model": classifier.name, "filename": filename}

    return app


async def read_upload(request: Request, max_upload_bytes: int) -> tuple[bytes, str]:
    """The uploaded photo's bytes and file name ("" when sent as raw bytes).

    Anything else (too large, no file, a malformed form) raises an
    HTTPException, which the app answers as a 4xx JSON error.
    """
    body = await read_body(request, max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        data, filename = await read_form_file(request, body)
    elif content_type.startswith(("image/", "application/octet-stream")):
        data, filename = bytes(body), ""
    else:
        raise HTTPException(400, "no file: POST the photo as multipart/form-data field 'file',"
                                 " or as the raw bytes with an image/* Content-Type.")
    if len(data) > max_upload_bytes:
        raise HTTPException(413, f"upload too large: {len(data):,} bytes, the limit is {max_upload_bytes:,}"
                                 " (serve.max_upload_bytes).")
    return data, filename


async def read_body(request: Request, max_upload_bytes: int) -> bytearray:
    """The request's body, read as it streams in; a 413 HTTPException once it passes the limit.

    The limit is `max_upload_bytes` plus room for the multipart framing. An
    oversized body (declared or seen) is read on and thrown away, up to
    DRAIN_LIMIT, before the answer.
    """
    limit = max_upload_bytes + MULTIPART_SLACK
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    body, drained = bytearray(), 0
    async for chunk in request.stream():
        if too_large:
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                break
            continue
        body += chunk
        too_large = len(body) > limit
    if too_large:
        raise HTTPException(413, f"upload too large: the limit is {max_upload_bytes:,} bytes (serve.max_upload_bytes).")
    return body


async def read_form_file(request: Request, body: bytearray) -> tuple[bytes, str]:
    """The bytes and file name of the multipart form field `file` in `body`; a 400 HTTPException without one."""
    async def replay():
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=20).parse()
    except MultiPartException as exception:
        raise HTTPException(400, f"malformed multipart upload: {exception.message}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        await form.close()
        raise HTTPException(400, "no file: send the photo as the multipart form field 'file'"
                                 " (e.g. curl -F file=@photo.jpg http://HOST:PORT/predict).")
    data, filename = await upload.read(), upload.filename or ""
    await form.close()
    if not data and not filename:  # a browser form submitted without choosing a file
        raise HTTPException(400, "no file: choose a photo to upload.")
    return data, filename


def from_environment(name: str, default, convert=str, low=None, high=None):
    """Environment variable `name` converted (int, float, str) and range-checked, or `default` when unset or empty."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = convert(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a valid {convert.__name__}: unset it or give a number"
                        + (" (or auto)." if name == "MIN_CONFIDENCE" else ".")) from None
    if (low is not None and value < low) or (high is not None and value > high):
        limits = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UserError(f"{name}={text!r} is out of range: it must be {limits}.")
    return value


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=from_environment("PORT", 8000, int),
                        help="port to listen on (default: $PORT or 8000)")
    parser.add_argument("--host", default=os.environ.get("HOST") or None,
                        help="address to listen on (default: $HOST or serve.host)")
    parser.add_argument("--model", default=os.environ.get("MODEL") or None,
                        help="cnn, transfer, best, or the path of a .keras, .onnx or .tflite file"
                             " (default: $MODEL or predict_new.model)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    if not 0 < arguments.port < 65536:
        raise UserError(f"port {arguments.port} is not a TCP port: set PORT (or --port) to 1..65535.")
    params = load_params()
    model_file = choose_model(arguments.model or params.predict_new.model)
    if model_file.suffix == ".keras":  # an exported file needs no Keras backend at all
        device.choose_backend()
    min_confidence = params.predict_new.min_confidence
    if os.environ.get("MIN_CONFIDENCE", "") != "auto":
        min_confidence = from_environment("MIN_CONFIDENCE", min_confidence, float, 0, 1)
    max_upload_bytes = from_environment("MAX_UPLOAD_BYTES", params.serve.max_upload_bytes, int, 1024)
    classifier = Classifier(model_file, top_k=params.predict_new.top_k, min_confidence=min_confidence,
                            batch_size=SERVE_BATCH,
                            check_classes=None if arguments.model in (None, *MODEL_CHOICES) else False)
    app = create_app(classifier, max_upload_bytes)
    host = arguments.host or params.serve.host
    print(f"serving {model_file} ({len(classifier.class_names)} classes) on http://{host}:{arguments.port}/", flush=True)
    uvicorn.run(app, host=host, port=arguments.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    run_stage(main)
