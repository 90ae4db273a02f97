"""What a model file may make this process do when it loads: checks made before TensorFlow reads it.

Artifacts and checkpoints are verified against the sha256 sums their metadata records before
anything loads (:mod:`pneumonia.artifacts.registry`, :mod:`pneumonia.models.checkpoint`): that
catches corruption and a swapped model file. These checks are the second line, for a file that
matches its metadata but was written by someone else (or whose metadata was rewritten too):

- **Keras** (``model.keras``, Grad-CAM's model and every checkpoint). tf-keras loads a zip-format
  ``.keras`` file under ``safe_mode=True``, which refuses a ``Lambda`` layer's marshalled Python
  bytecode. But a file of that name that is not a zip (an HDF5 file, a folder) silently takes the
  legacy loader, which ignores ``safe_mode`` and runs such bytecode; and even in safe mode the
  loader imports whatever module a layer's config names. So before loading, :func:`check_keras_file`
  wants a regular file (no symbolic link), a zip, and a ``config.json`` whose every ``module`` is
  Keras's own (``keras``, ``tf_keras``, ``builtins``) with no ``Lambda`` layer; then it loads with
  ``safe_mode=True`` explicitly. The project's networks (xraynet, seed, their ensembles) use only
  built-in layers and register no custom objects, so they all pass.
- **SavedModel** (``saved_model/``, what serving and scoring run). Loading one runs no Python from
  the file (``tf.py_function`` cannot be saved), but its graphs are TensorFlow programs: called,
  they run whatever ops they hold, and TensorFlow has ops that read and write files
  (``ReadFile``, ``WriteFile``, ``MatchingFiles``), save and restore checkpoints anywhere, print
  to a file, open readers and datasets over files, write summaries, call RPCs or look for a
  Python callback (``PyFunc``, ``EagerPyFunc``). :func:`check_saved_model` parses
  ``saved_model.pb`` before ``tf.saved_model.load`` and refuses a graph with any op of
  :data:`NEVER_OPS` anywhere, or with a checkpoint op (:data:`CHECKPOINT_OPS`) outside the
  functions that only the file's own saver calls (the loader restores variables with its own ops;
  C++ loaders use the saver). Our exports pass: their signature runs convolutions, batch norm and
  matrix products only.

Limits: a deny-list names what is known to touch files, the network or Python today; a new
TensorFlow op or a custom-op library loaded into the process is not on it. It does not bound
compute or memory (a graph may loop or allocate a lot). The sha256 sums live in the metadata
next to the files, so protect write access to the registry and to run storage.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

from pneumonia.errors import CheckpointError

KERAS_MODULES = ("keras", "tf_keras")
"""Top-level packages a ``.keras`` config may name as a layer's, function's or object's module."""
REFUSED_LAYERS = frozenset({"Lambda"})
"""Layers whose config carries Python code (bytecode or a function reference); none of ours."""
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A ``config.json`` above this (an ensemble of many members is ~100 KB) is refused unread."""

NEVER_OPS = frozenset({
    # Python callbacks: not serialisable, but a crafted graph can name them.
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    # Files: read, write, list, map into memory.
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "LoadAndRemapMatrix", "GenerateVocabRemap",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TFRecordReader", "TFRecordReaderV2", "LMDBReader",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "LMDBDataset", "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset",
    "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset", "CacheDataset", "CacheDatasetV2",
    "SnapshotDataset", "SnapshotDatasetV2", "SaveDataset", "SaveDatasetV2", "LoadDataset",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord",
    # Writing elsewhere: summaries, printing (PrintV2 can print to a file), debugging taps.
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter", "Print", "PrintV2",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
    "DebugNumericSummaryV2",
    # Protos described by a file named in the graph.
    "DecodeProtoV2", "EncodeProto",
    # The network.
    "Rpc", "TryRpc", "RpcClient", "RpcCall", "RpcServer", "RpcServerStart", "RpcServerRegister",
    "DataServiceDataset", "DataServiceDatasetV2", "DataServiceDatasetV3", "DataServiceDatasetV4",
    "RegisterDataset", "RegisterDatasetV2",
})
"""Ops a classifier never needs, refused anywhere in a SavedModel."""
CHECKPOINT_OPS = frozenset({"Save", "SaveSlices", "SaveV2", "Restore", "RestoreSlice", "RestoreV2", "MergeV2Checkpoints"})
"""Ops that read or write checkpoint files at a path: allowed only where the file's saver uses them."""
SAVED_MODEL_FILE = "saved_model.pb"
OTHER_GRAPH_FILES = ("saved_model.pbtxt", "saved_model.cpb")
"""Files TensorFlow would read instead of (or beside) ``saved_model.pb``: refused, so that the file
checked is the file loaded."""


class UnsafeModelError(CheckpointError):
    """A model file could run code, or touch files, when loaded or called."""


# ----------------------------------------------------------------------------- Keras


def check_keras_file(path: Path) -> None:
    """A regular zip-format ``.keras`` file whose config names only Keras's own modules and no
    Lambda layer, or an UnsafeModelError saying what is wrong."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise UnsafeModelError(f"{path} is not a regular file (a link or a folder is not loaded)")
    if not zipfile.is_zipfile(path):
        raise UnsafeModelError(f"{path} is not a Keras v3 (zip) file; other formats load without safe mode")
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                raise UnsafeModelError(f"{path}: config.json is larger than {MAX_CONFIG_BYTES:,} bytes")
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, RuntimeError) as error:
        raise UnsafeModelError(f"{path} has no readable config.json ({type(error).__name__})") from None
    problems = sorted(set(_config_problems(config)))
    if problems:
        raise UnsafeModelError(f"{path} refused: its config names {', '.join(problems)}; "
                               "only Keras's own layers are loaded")


def _config_problems(value) -> Iterable[str]:
    if isinstance(value, dict):
        if value.get("class_name") in REFUSED_LAYERS:
            yield f"a {value['class_name']} layer"
        module = value.get("module")
        if module is not None and not _keras_module(module):
            yield f"module {str(module)[:80]!r}"
        for item in value.values():
            yield from _config_problems(item)
    elif isinstance(value, list):
        for item in value:
            yield from _config_problems(item)


def _keras_module(module) -> bool:
    return isinstance(module, str) and (module == "builtins" or module.split(".")[0] in KERAS_MODULES)


def load_keras_model(path: Path, compile: bool = False):
    """A checked ``.keras`` file (:func:`check_keras_file`) loaded by tf-keras in safe mode."""
    import tensorflow as tf

    check_keras_file(path)
    try:
        return tf.keras.models.load_model(str(path), compile=compile, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged file
        raise CheckpointError(f"cannot load {path}: {error}") from None


# ----------------------------------------------------------------------------- SavedModel


def check_saved_model(directory: Path) -> None:
    """Refuse a SavedModel folder whose graph holds file, network or Python ops (see the module
    docstring), before TensorFlow loads it; UnsafeModelError names the ops."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    directory = Path(directory)
    others = [name for name in OTHER_GRAPH_FILES if (directory / name).exists()]
    if others:
        raise UnsafeModelError(f"{directory} holds {', '.join(others)} beside {SAVED_MODEL_FILE}; refused")
    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString((directory / SAVED_MODEL_FILE).read_bytes())
    except (OSError, DecodeError) as error:
        raise UnsafeModelError(f"{directory / SAVED_MODEL_FILE} is not a readable SavedModel "
                               f"({type(error).__name__})") from None
    found: set[str] = set()
    for graph in model.meta_graphs:
        found |= forbidden_ops(graph)
    if found:
        raise UnsafeModelError(f"{directory} refused: its graph holds {', '.join(sorted(found))} "
                               "(ops that touch files, the network or Python; a classifier needs none)")


def forbidden_ops(graph) -> set[str]:
    """The refused ops of one MetaGraphDef: :data:`NEVER_OPS` anywhere, :data:`CHECKPOINT_OPS`
    anywhere but in the functions only its saver calls."""
    functions = {function.signature.name: function for function in graph.graph_def.library.function}
    saver_names = {name.split(":")[0] for name in (graph.saver_def.save_tensor_name, graph.saver_def.restore_op_name)
                   if name}
    saver_nodes = [node for node in graph.graph_def.node if node.name in saver_names]
    other_nodes = [node for node in graph.graph_def.node if node.name not in saver_names]
    saving = _reachable(_calls(saver_nodes, functions), functions)
    running = _reachable(_calls(other_nodes, functions) | set(graph.object_graph_def.concrete_functions), functions)
    running |= set(functions) - saving  # a function nothing calls is judged as if something did
    found = {node.op for node in saver_nodes if node.op in NEVER_OPS}
    found |= {node.op for node in other_nodes if node.op in NEVER_OPS | CHECKPOINT_OPS}
    for name in saving - running:
        found |= {node.op for node in functions[name].node_def if node.op in NEVER_OPS}
    for name in running & set(functions):
        found |= {node.op for node in functions[name].node_def if node.op in NEVER_OPS | CHECKPOINT_OPS}
    return found


def _calls(nodes, functions: dict) -> set[str]:
    """Names of the functions these nodes call: by a function-valued attribute (``f``,
    ``then_branch``, ``body``, ...) or by the function's name as their op."""
    called = set()
    for node in nodes:
        if node.op in functions:
            called.add(node.op)
        for attr in node.attr.values():
            if attr.HasField("func"):
                called.add(attr.func.name)
            if attr.HasField("list"):
                called.update(function.name for function in attr.list.func)
    return called


def _reachable(roots: set[str], functions: dict) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in functions:
            todo.extend(_calls(functions[name].node_def, functions) - seen)
    return seen
