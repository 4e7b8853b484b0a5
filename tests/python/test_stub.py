"""The typed stub ``_native.pyi`` describes the native module exactly: same functions, classes,
methods and parameter names."""

import ast
import inspect
from pathlib import Path

import hybridgen
from hybridgen import _native

STUB = Path(hybridgen.__file__).with_name("_native.pyi")


def stub_params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg != "self"]


def native_params(obj) -> list[str]:
    return [p for p in inspect.signature(obj).parameters if p != "self"]


def stub_tree():
    tree = ast.parse(STUB.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    return functions, classes


def test_functions_match():
    functions, _ = stub_tree()
    native = {n for n, o in vars(_native).items() if callable(o) and not isinstance(o, type)}
    assert set(functions) == native
    for name, fn in functions.items():
        assert stub_params(fn) == native_params(getattr(_native, name)), name


def test_classes_and_methods_match():
    _, classes = stub_tree()
    native = {n for n, o in vars(_native).items() if isinstance(o, type) and not issubclass(o, BaseException)}
    assert set(classes) - {"CapacityError", "CudaUnavailableError"} == native
    for cls_name in native:
        cls = getattr(_native, cls_name)
        members = {n.name: n for n in classes[cls_name].body if isinstance(n, ast.FunctionDef)}
        public = {n for n in dir(cls) if not n.startswith("_")}
        assert set(members) - {"__init__"} == public, cls_name
        for name, fn in members.items():
            if name == "__init__":
                assert stub_params(fn) == native_params(cls), cls_name
            elif not any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list):
                assert stub_params(fn) == native_params(getattr(cls, name)), f"{cls_name}.{name}"
