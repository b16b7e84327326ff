"""Patches as the Kubernetes fake applies them: JSON merge patch (RFC 7386; also used for strategic merge
patches of built-in kinds, as the kinds served have no merge-keyed lists we rely on) and JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
from typing import Any

from tests.fakes.kube.errors import ApiError, bad_request


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` removes a key; lists are replaced whole)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives: not needed by the kinds served here
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} does not exist")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise bad_request(f"invalid json patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        parts = _pointer(path)
        if op in ("move", "copy"):
            value = copy.deepcopy(_walk(doc, _pointer(operation.get("from", "")), operation.get("from", "")))
            if op == "move":
                doc = json_patch(doc, [{"op": "remove", "path": operation["from"]}])
            doc = json_patch(doc, [{"op": "add", "path": path, "value": value}])
            continue
        if op == "test":
            if _walk(doc, parts, path) != operation.get("value"):
                raise ApiError(422, "Invalid", f"jsonpatch: test operation for path {path!r} failed")
            continue
        if not parts:
            if op == "remove":
                raise bad_request("jsonpatch: cannot remove the document root")
            doc = copy.deepcopy(operation.get("value"))
            continue
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if op == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
                if not 0 <= index <= len(parent):
                    raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} is out of range")
                parent.insert(index, copy.deepcopy(operation.get("value")))
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(operation.get("value"))
            else:
                raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} does not exist")
        elif op in ("remove", "replace"):
            _walk(parent, [last], path)
            if op == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            else:
                parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(operation.get("value"))
        else:
            raise bad_request(f"jsonpatch: unknown operation {op!r}")
    return doc
