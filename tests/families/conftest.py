"""One compile per family for the whole session: the one-device matrix (ATen and Triton) and the
residual-structure tests read the same captured Program."""

from __future__ import annotations

import pytest

_COMPILED: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def one_device_program():
    """family -> (loaded model, the Program `meshc.compile` made for one device), compiled once."""

    def get(family: str):
        import meshc
        from meshc.models import load_model

        if family not in _COMPILED:
            loaded = load_model(family, batch=2, seq=8)
            compiled = meshc.compile(loaded.model, example_inputs=loaded.example_inputs,
                                     example_kwargs=loaded.example_kwargs, backend="aten")
            _COMPILED[family] = (loaded, compiled.program)
        return _COMPILED[family]

    return get
