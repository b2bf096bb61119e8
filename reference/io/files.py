"""The one guarded way into a model directory: a checkpoint folder (and a port's trace file) is untrusted input.

Every file the project reads from a model directory goes through `inside` and `open_file`:
- its name is a plain file name (never `../x` or an absolute path, which an index's weight_map could give);
- its real path, every link resolved, lies inside the directory (a link to /etc/passwd or /dev/zero is refused);
- it is opened without blocking and must be a regular file (open() on a FIFO waits forever, a device never ends);
- it is at most the size cap of its kind (LIMITS), checked on the open file, before a byte is read;
- JSON is parsed with a depth limit, and a key given twice in one object is refused (json.loads keeps the last).
Every error is a FileError (a ValueError): one line naming the file and, where there is one, the field, with long
values cut (`shown`). docs/security.md states the promise and tests/security/ tries to break it.
"""

import itertools
import json
import os
import stat

MiB = 1 << 20
# Bytes a file of each kind may have: far above any real one (jetmoe-8b's tokenizer.json is 1.8 MB, Gemma's
# 33 MB), far below what would exhaust memory. "header" is a safetensors header, capped as the safetensors library
# caps it (MAX_HEADER_SIZE = 100,000,000 bytes).
LIMITS = {"config": 4 * MiB, "index": 64 * MiB, "tokenizer": 64 * MiB, "tokenizer_config": 16 * MiB,
          "train_log": 64 * MiB, "header": 100_000_000, "text": 1 << 30}  # text: evaluate's --text-file
MAX_JSON_DEPTH = 64  # nesting of objects and lists; config.json needs 3, a tokenizer.json 5
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}

SHOWN, SHOWN_ITEMS = 60, 6  # characters of a value, items of a container, that an error message shows


class FileError(ValueError):
    """A file that may not or cannot be read as its kind: the message names it, and the field where one is at fault."""


def shown(value, depth=0):
    """repr(value) with long strings and long or deep containers cut, so a 100 MB string never becomes a 100 MB
    error line (reprlib would sort a dict's keys; this keeps the file's order)."""
    if isinstance(value, str):
        return repr(value[:SHOWN]) + (f"... ({len(value):,} characters)" if len(value) > SHOWN else "")
    if isinstance(value, (dict, list, tuple)):
        is_dict = isinstance(value, dict)
        if depth >= 3:  # checked before looking inside: a deep value costs no more than a shallow one
            return "{...}" if is_dict else "[...]"
        first = list(itertools.islice(value.items() if is_dict else value, SHOWN_ITEMS))
        items = ([f"{shown(k)}: {shown(v, depth + 1)}" for k, v in first] if is_dict
                 else [shown(v, depth + 1) for v in first])
        more = ", ..." if len(value) > SHOWN_ITEMS else ""
        return ("{%s%s}" if is_dict else "[%s%s]") % (", ".join(items), more)
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def inside(directory, name):
    """directory/name for a file a model directory may hold (config.json, a shard, tokenizer.json), checked first:
    `name` must be a plain file name and the path, links resolved, must stay in the directory. FileError otherwise."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") or "\0" in name:
        raise FileError(f"{shown(name)} is not a file name inside the model directory {directory!r}")
    path = os.path.join(directory, name)
    root, real = os.path.realpath(directory), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise FileError(f"{path} leads outside the model directory (to {shown(real)})")
    return path


def present(path):
    """True where something, even a FIFO or a dangling link, is at path: an optional file that is there is read
    (and refused if it is not a regular file), never taken as absent."""
    return os.path.lexists(path)


def open_file(path, kind):
    """The regular file at path, opened for binary reading, after checking its type and its size against
    LIMITS[kind] (None: no cap, for files that are memory-mapped, not read). FileNotFoundError where nothing is
    there, FileError for anything else that is not a regular file of a plausible size."""
    try:  # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer
        f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise FileError(f"{path} is a directory, not a regular file") from None
    except OSError as error:
        raise FileError(f"{path} cannot be opened: {error.strerror}") from None
    info = os.fstat(f.fileno())  # the file opened, not the name: it cannot be swapped after the check
    limit = None if kind is None else LIMITS[kind]
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not a regular file"
    elif limit is not None and info.st_size > limit:
        problem = f"is {info.st_size:,} bytes, over the {limit:,}-byte cap for a {kind.replace('_', ' ')} file"
    if problem:
        f.close()
        raise FileError(f"{path} {problem}")
    return f


def read_bytes(path, kind):
    """The bytes of the regular file at path, at most LIMITS[kind] of them; a file that grows while read is refused
    (its size, checked against the cap, is what is read: no cap-sized buffer is allocated)."""
    with open_file(path, kind) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1)
    if len(data) != size:
        raise FileError(f"{path} changed size while it was read")
    return data


def read_text(path, kind):
    """The UTF-8 text of the file at path (read_bytes); FileError naming the first bad byte."""
    data = read_bytes(path, kind)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileError(f"{path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start}") from None


def parse_json(text, source):
    """json.loads(text) with a key twice in one object refused and nesting at most MAX_JSON_DEPTH; FileError naming
    `source` (the file) otherwise. Python's parser recurses per level, so a deeper file is stopped either by its
    recursion limit or by the walk after it."""
    def unique(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise FileError(f"{source}: the key {shown(twice)} appears twice in one object")
        return out

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except FileError:
        raise
    except RecursionError:
        raise FileError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as error:
        raise FileError(f"{source} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") \
            from None
    except ValueError as error:  # a number of more than 4300 digits
        raise FileError(f"{source} is not valid JSON: {shown(str(error))}") from None
    check_depth(value, source)
    return value


def check_depth(value, source):
    """FileError when value (parsed JSON) nests objects and lists deeper than MAX_JSON_DEPTH; iterative, so a
    deep value cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise FileError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def read_json(path, kind):
    """The parsed JSON of the file at path (read_text, then parse_json)."""
    return parse_json(read_text(path, kind), path)


def read_json_object(path, kind):
    """read_json, which must give a JSON object (a dict)."""
    value = read_json(path, kind)
    if not isinstance(value, dict):
        raise FileError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
