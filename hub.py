"""Checkpoints by hub id (e.g. llava-hf/llava-interleave-qwen-0.5b-hf): the local Hugging Face cache, else a download.

Only the standard library. It follows the hub's own URL and cache layouts, so what transformers or huggingface_hub
fetched is found here, and what is fetched here they find:

    {HF_ENDPOINT}/api/models/{repo}/revision/main?blobs=true    the commit and the file list, with sizes
    {HF_ENDPOINT}/{repo}/resolve/{commit}/{file}                 a file (the hub redirects large ones to its CDN)
    {HF cache}/models--{org}--{name}/snapshots/{commit}/{file}   and refs/main holding the commit

Only the files the model needs are fetched. Each goes to {file}.incomplete, is resumed with an HTTP Range request
when the connection breaks (here, or in a later run), is checked against its listed size and only then renamed into
place; refs/main is written last, so an interrupted download never looks complete.
"""
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request

from interleave import CheckpointError

OPTIONAL = ("tokenizer.json", "generation_config.json")   # fetched when the repo has them


def local_path(name):
    """The folder of a checkpoint given as a folder path or as a hub id (the same rule as interleave.load)."""
    name = os.fspath(name)
    return snapshot(name) if not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else name


def cache_root():
    """Where huggingface_hub keeps models: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def has_weights(folder):
    """config.json and every weight file (the single file, or the index and all its shards) are in place."""
    try:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            files = set(json.load(f)["weight_map"].values())
    except FileNotFoundError:
        files = {"model.safetensors"}
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all(os.path.isfile(os.path.join(folder, name)) for name in files | {"config.json"})


def snapshot(repo_id):
    """The local folder of a hub model: from the cache when it is complete there, else downloaded into the cache."""
    repo_dir = os.path.join(cache_root(), "models--" + repo_id.replace("/", "--"))
    try:
        with open(os.path.join(repo_dir, "refs", "main")) as f:
            folder = os.path.join(repo_dir, "snapshots", f.read().strip())
        if has_weights(folder):
            return folder
    except OSError:
        pass
    return download(repo_id, repo_dir)


def offline_error(repo_id, endpoint, why):
    return CheckpointError(
        f"cannot download {repo_id} from {endpoint} ({why}). It is not a local folder nor in the Hugging Face cache "
        f"({cache_root()}): on a machine with network, download the model folder (config.json, tokenizer.json, "
        f"*.safetensors) from https://huggingface.co/{repo_id} and pass the folder's path instead of the id")


def download(repo_id, repo_dir):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise offline_error(repo_id, endpoint, "HF_HUB_OFFLINE is set")
    try:
        with request(f"{endpoint}/api/models/{repo_id}/revision/main?blobs=true") as response:
            info = json.load(response)
        commit, sizes = info["sha"], {s["rfilename"]: s.get("size") for s in info["siblings"]}
    except urllib.error.HTTPError as e:   # the hub answers 401 for a repo that does not exist (or is private)
        if e.code in (401, 403, 404):
            raise CheckpointError(f"{repo_id} is neither a local folder nor a model on {endpoint} (HTTP {e.code}); "
                                  "check the path or the id (a private or gated model also needs HF_TOKEN)") from None
        raise CheckpointError(f"{endpoint} answered HTTP {e.code} for {repo_id}; try again later") from None
    except (OSError, http.client.HTTPException) as e:   # URLError (no route, DNS, refused) is an OSError
        raise offline_error(repo_id, endpoint, getattr(e, "reason", e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{endpoint} sent an unexpected answer for {repo_id} ({e!r})") from None
    if not re.fullmatch(r"[\w.-]+", commit) or "config.json" not in sizes:
        raise CheckpointError(f"{repo_id} on {endpoint} has no config.json: is it a model checkpoint?")
    weights = "model.safetensors" if "model.safetensors" in sizes else "model.safetensors.index.json"
    if weights not in sizes:
        raise CheckpointError(f"{repo_id} has no model.safetensors(.index.json); this program reads safetensors only")
    folder = os.path.join(repo_dir, "snapshots", commit)
    for name in ["config.json", *[name for name in OPTIONAL if name in sizes], weights]:
        fetch(f"{endpoint}/{repo_id}/resolve/{commit}/{name}", folder, name, sizes[name])
    if weights.endswith(".index.json"):
        try:
            with open(os.path.join(folder, weights)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{repo_id}: {weights} is unreadable ({e!r})") from None
        for name in shards:   # names come from the server: never let one climb out of the folder
            if not re.fullmatch(r"\w[\w.-]*", name):
                raise CheckpointError(f"{repo_id}: bad shard name {name!r} in {weights}")
            fetch(f"{endpoint}/{repo_id}/resolve/{commit}/{name}", folder, name, sizes.get(name))
    refs = os.path.join(repo_dir, "refs", "main")
    os.makedirs(os.path.dirname(refs), exist_ok=True)
    with open(refs + ".incomplete", "w") as f:
        f.write(commit)
    os.replace(refs + ".incomplete", refs)
    return folder


def request(url, start=0):
    req = urllib.request.Request(url, headers={"User-Agent": "interleave"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    if os.environ.get("HF_TOKEN"):   # for gated models; not passed on to the CDN the hub redirects to
        req.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    return urllib.request.urlopen(req, timeout=60)


def fetch(url, folder, name, size, attempts=3):
    """Download url to folder/name through name.incomplete, resuming what an earlier try left; size is checked."""
    path, error = os.path.join(folder, name), None
    if os.path.isfile(path) and size in (None, os.path.getsize(path)):
        return
    os.makedirs(folder, exist_ok=True)
    part = path + ".incomplete"
    done = os.path.getsize(part) if os.path.isfile(part) else 0
    done = 0 if size is not None and done > size else done   # longer than the listed file: not to be trusted
    for _ in range(attempts):
        if size is not None and done >= size:
            break
        try:
            with request(url, done) as response, open(part, "ab" if done else "wb") as f:
                if response.status != 206:   # the server sent the whole file: start over
                    f.truncate(0)
                    done = 0
                size = size if size is not None else done + int(response.headers["Content-Length"])
                started, first = time.time(), done
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    progress(name, done - first, done, size, started)
                progress(name, done - first, done, size, started, final=True)
        except urllib.error.HTTPError as e:
            raise CheckpointError(f"downloading {url} failed: HTTP {e.code}") from None
        except (OSError, http.client.HTTPException, KeyError, ValueError) as e:   # a dropped or stalled connection
            error = e
    if size is None or done != size:
        why = f"{done} of {size or '?'} bytes" + (f", {error}" if error else "")
        raise CheckpointError(f"download of {name} stopped ({why}); run again to resume it")
    os.replace(part, path)


def progress(name, got, done, size, started, final=False):
    """A bar on stderr when it is a terminal, redrawn for every MiB; elsewhere one line for each finished file."""
    if sys.stderr.isatty() or (final and done == size):
        mib, bar = 2 ** 20, "#" * (30 * done // max(size, 1))
        print(f"\r{name} [{bar:<30}] {done / mib:.1f}/{size / mib:.1f} MiB, "
              f"{got / mib / max(time.time() - started, 1e-3):.1f} MiB/s", end="\n" if final else "", file=sys.stderr,
              flush=True)
