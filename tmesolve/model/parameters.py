"""The one parameter table: every number of MODEL.md with units, range and source.

Each :class:`Parameter` carries its default in core units (length µm, time h,
cell densities cells/mm³, cytokines ng/mL, antibodies µg/mL, oxygen mmHg, drug
amounts mg; 1 cell/µL = 1 cell/mm³), an inclusive valid range, the source of
the number and a one-line description. Sources follow ``/work/shared/PARAMETERS.md``:
a paper or label, ``calibrated: <what>`` (well-mixed prototype or the 2-D
checks) or ``chosen: <reason>``.

Config values reach the core through :func:`validate_overrides` (unknown names,
units and ranges are checked there, before anything compiles) and
:func:`make_params`, which builds :class:`ModelParams`, a pytree whose leaves
are all arrays: changing a number never recompiles.

``python -m tmesolve.model.parameters`` regenerates ``docs/parameters.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tmesolve._pytree import pytree_dataclass
from tmesolve.errors import ConfigError
from tmesolve.units import IGG_MOLAR_MASS_G_PER_MOL, convert

__all__ = [
    "Parameter",
    "PARAMETERS",
    "TABLE",
    "GROUPS",
    "default_values",
    "validate_overrides",
    "ModelParams",
    "make_params",
    "render_parameters_markdown",
    "write_parameters_markdown",
]

_LN2 = math.log(2.0)
_HOURS_PER_DAY = 24.0
_HOURS_PER_YEAR = 365.25 * 24.0
_INF = math.inf

#: Group names, in the order the generated table lists them.
GROUPS = (
    "tumour",
    "tcell",
    "oxygen",
    "cytokine",
    "pd1",
    "drug",
    "tissue",
    "systemic",
    "memory",
    "act",
    "irae",
    "numerics",
)

_GROUP_TITLES = {
    "tumour": "Tumour cells, necrosis, antigenicity",
    "tcell": "Effector and exhausted CD8 T cells in tissue",
    "oxygen": "Oxygen",
    "cytokine": "Cytokines and chemokines (IFN-γ, CXCL9/10, IL-2, TGF-β)",
    "pd1": "PD-1/PD-L1 synapse and PD-L1 expression",
    "drug": "Antibodies in tissue and binding",
    "tissue": "Tissue mixture, stroma, imaging and classification",
    "systemic": "Systemic compartment: antigen, priming, blood effectors",
    "memory": "Memory T cells and recall",
    "act": "Adoptive cell transfer and lymphodepletion",
    "irae": "Immune-related adverse events and their management",
    "numerics": "Numerical rules",
}


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One entry of the parameter table.

    Attributes:
        symbol: ASCII identifier used in code and config (``"r_C"``), matching
            the symbol of MODEL.md.
        value: default, in core units.
        units: core units, readable by :mod:`tmesolve.units` (``"1/h"``).
        low, high: inclusive valid range (core units).
        source: paper or label, ``"calibrated: ..."`` or ``"chosen: ..."``.
        description: one line.
        group: one of :data:`GROUPS`.
        per_lesion: may differ between lesions of one patient (phenotype or
            TMB dependent); such parameters have shape ``(lesions,)``.
    """

    symbol: str
    value: float
    units: str
    low: float
    high: float
    source: str
    description: str
    group: str
    per_lesion: bool = False


def _p(
    symbol: str,
    value: float,
    units: str,
    low: float,
    high: float,
    group: str,
    description: str,
    source: str,
    per_lesion: bool = False,
) -> Parameter:
    return Parameter(symbol, float(value), units, float(low), float(high), source, description,
                     group, per_lesion)


# Conversions used below (PARAMETERS.md): 1 µm²/s = 3600 µm²/h; 1 cm²/s = 3.6e11 µm²/h.
_UM2_PER_H_PER_CM2_PER_S = 1e8 * 3600.0

PARAMETERS: tuple[Parameter, ...] = (
    # ------------------------------------------------------------------ tumour
    _p("r_C", 2.0e-3, "1/h", 0.0, 0.1, "tumour",
       "tumour-cell proliferation rate (scaled by Φ_O and (1 − φ)₊)",
       "calibrated in 3-D (docs/model.md): untreated hot lesion doubles its burden in ~6 "
       "weeks (16³ × 50 µm); ×3 the well-mixed 6.2e-4 /h, because a lesion started near "
       "packing grows only at its rim, where (1 − φ) is large", per_lesion=True),
    _p("K_C", 8.7e4, "cells/mm^3", 1.0, 4e6, "tumour",
       "half-saturation of engagement e = a·C/(C + K_C)",
       "calibrated: well-mixed prototype (PARAMETERS.md)"),
    _p("k_kill", 0.30, "1/h", 0.0, 10.0, "tumour",
       "kill rate per tumour-reactive effector (7.2 kills/day)",
       "Halle 2016 (2–16 kills per CTL per day); calibrated in 3-D (docs/model.md): "
       "0.1 /h only held a hot lesion static under anti-PD-1"),
    _p("k_nec", 0.01, "1/h", 0.0, 1.0, "tumour",
       "hypoxic necrosis rate of viable tumour cells", "chosen (PARAMETERS.md)"),
    _p("O_n", 2.5, "mmHg", 0.0, 40.0, "tumour",
       "oxygen level of the hypoxic switch σ_hyp(O) = O_nⁿ/(O_nⁿ + Oⁿ)", "chosen (PARAMETERS.md)"),
    _p("n_hyp", 4.0, "1", 1.0, 20.0, "tumour",
       "Hill exponent of the hypoxic switch", "chosen (PARAMETERS.md)"),
    _p("lambda_N", 0.005, "1/h", 0.0, 1.0, "tumour",
       "clearance rate of necrotic debris", "chosen (PARAMETERS.md)"),
    _p("D_C", 2.0, "um^2/h", 0.0, 1e4, "tumour",
       "random motility of tumour cells", "2-D prototype (PARAMETERS.md)"),
    _p("TMB", 15.0, "mut/Mb", 0.0, 1000.0, "tumour",
       "tumour mutational burden of the lesion (sets antigenicity a and priming τ(TMB))",
       "chosen: inflamed preset (hot 15, excluded 6, desert 2 mut/Mb; PARAMETERS.md)",
       per_lesion=True),
    _p("TMB_0", 6.5, "mut/Mb", 0.01, 1000.0, "tumour",
       "TMB scale of antigenicity a = 1 − exp(−TMB/TMB_0) and of priming τ(TMB)",
       "chosen: a(15 mut/Mb) ≈ 0.9 (PARAMETERS.md)"),
    _p("n_ext", 1.0, "cells", 0.0, 1e6, "tumour",
       "extinction: a lesion with fewer viable cells than this is set to C = 0",
       "chosen: one cell (MODEL.md, Extinction)"),
    # ------------------------------------------------------------------- tcell
    _p("f_spec", 0.1, "1", 0.0, 1.0, "tcell",
       "tumour-reactive fraction of tissue effectors, T* = f_spec·T",
       "calibrated: third 2-D check (CD8 densities in IHC ranges); rises with TMB",
       per_lesion=True),
    _p("D_T", 600.0, "um^2/h", 0.0, 1e5, "tcell",
       "T-cell random motility (Itô form ∇²(D_T·m·T))",
       "2-D prototype: 10 µm²/min keeps penetration √(D_T·m/δ_T) ≈ 160 µm (PARAMETERS.md); "
       "PhysiCell 3–100 µm²/min"),
    _p("chi_0", 2000.0, "um^2/h/(ng/mL)", 0.0, 1e6, "tcell",
       "chemotactic sensitivity χ(X) = χ_0/(1 + X/K_chi)²",
       "calibrated: 2-D prototype (2e4 turns excluded into inflamed)"),
    _p("K_chi", 2.0, "ng/mL", 1e-6, 1e4, "tcell",
       "receptor-saturation scale of chemotaxis", "calibrated: 2-D prototype"),
    _p("s_m", 0.9, "1", 0.0, 1.0, "tcell",
       "stromal slowing of motility, m = (1 − s_m·S)₊/(1 + B/K_Bm)",
       "calibrated: 2-D prototype (0.9–0.99)"),
    _p("K_Bm", 1.0, "ng/mL", 1e-6, 1e4, "tcell",
       "TGF-β level halving motility and extravasation (Mariathasan 2018)",
       "calibrated: 2-D prototype (0.3 turns excluded into desert)"),
    _p("k_in", 40.0, "1/h", 0.0, 1e3, "tcell",
       "extravasation rate per unit vessel density V and blood effector level T_b",
       "calibrated in 3-D (docs/model.md): hot-core CD8 ≈ 440 cells/mm² at day 14; "
       "2-D checks used 20 (≤ tumour blood flow 6–60 /h)"),
    _p("alpha_0", 0.05, "1", 0.0, 100.0, "tcell",
       "baseline (chemokine-independent) extravasation factor", "calibrated: second 2-D check"),
    _p("alpha_X", 2.15, "1", 0.0, 100.0, "tcell",
       "chemokine-driven extravasation factor α_X·X/(X + K_X)", "calibrated: well-mixed prototype"),
    _p("K_X", 1.0, "ng/mL", 1e-6, 1e4, "tcell",
       "CXCL9/10 half-saturation of extravasation", "calibrated: well-mixed prototype"),
    _p("c_crowd", 0.8, "1", 0.0, 1.0, "tcell",
       "soft crowding of T-cell entry, c_T(φ) = 1 − c_crowd·min(φ, 1)",
       "calibrated: third 2-D check (T cells squeeze into packed tumour)"),
    _p("r_T", 8.8e-3, "1/h", 0.0, 1.0, "tcell",
       "antigen- and IL-2-driven expansion rate of tumour-reactive effectors",
       "calibrated: well-mixed prototype"),
    _p("K_L", 5.0, "ng/mL", 1e-6, 1e4, "tcell",
       "IL-2 half-saturation of expansion and uptake",
       "calibrated: well-mixed prototype; IL-2 half-max 0.32 nM (QSP-IO)"),
    _p("k_ex", 0.023, "1/h", 0.0, 10.0, "tcell",
       "exhaustion rate of engaged reactive effectors under PD-1 signalling (×H_PD)",
       "calibrated: well-mixed prototype"),
    _p("k_re", 0.0021, "1/h", 0.0, 10.0, "tcell",
       "reinvigoration of exhausted cells by blockade (×θ)", "calibrated: well-mixed prototype"),
    _p("delta_T", 0.0153, "1/h", 0.0, 10.0, "tcell",
       "death rate of effector T cells in tissue", "chosen (PARAMETERS.md)"),
    _p("delta_E", 0.005, "1/h", 0.0, 10.0, "tcell",
       "death rate of exhausted T cells", "chosen (PARAMETERS.md)"),
    # ------------------------------------------------------------------ oxygen
    _p("D_O", 6e6, "um^2/h", 0.0, 1e9, "oxygen",
       "oxygen diffusivity (1e5 µm²/min)", "BioFVM/PhysiCell default"),
    _p("lambda_O", 6.0, "1/h", 0.0, 1e4, "oxygen",
       "oxygen background decay (0.1 /min)", "BioFVM/PhysiCell default"),
    _p("k_V", 435.0, "1/h", 0.0, 1e5, "oxygen",
       "vessel oxygen exchange rate per unit vessel density",
       "calibrated: well-mixed prototype (O ≈ 30 mmHg hot, ≈ 16 mmHg cold)"),
    _p("O_b", 38.0, "mmHg", 0.0, 160.0, "oxygen",
       "oxygen partial pressure in vessels", "BioFVM/PhysiCell default"),
    _p("u_C", 0.03, "mmHg*mm^3/cells/h", 0.0, 10.0, "oxygen",
       "oxygen uptake per tumour cell", "≈ PhysiCell uptake at packing (PARAMETERS.md)"),
    _p("u_T", 0.03, "mmHg*mm^3/cells/h", 0.0, 10.0, "oxygen",
       "oxygen uptake per T cell (effector and exhausted)",
       "chosen: as u_C (PARAMETERS.md)"),
    _p("K_Ou", 1.0, "mmHg", 1e-6, 100.0, "oxygen",
       "oxygen half-saturation of uptake", "chosen (PARAMETERS.md)"),
    _p("K_O", 5.0, "mmHg", 1e-6, 100.0, "oxygen",
       "oxygen half-saturation of growth and killing, Φ_O = O/(O + K_O)",
       "chosen (PARAMETERS.md)"),
    # ---------------------------------------------------------------- cytokine
    _p("D_G", 1e-7 * _UM2_PER_H_PER_CM2_PER_S, "um^2/h", 0.0, 1e8, "cytokine",
       "IFN-γ diffusivity (1e-7 cm²/s)",
       "spQSP GPU (HCC) file; chosen the lower of 1e-7–1e-6 cm²/s (spQSP-IO) to keep "
       "IFN-γ local to engaged T cells"),
    _p("lambda_G", 0.234, "1/h", 0.0, 100.0, "cytokine",
       "IFN-γ decay (6.5e-5 /s, t½ ≈ 3 h)", "spQSP parameter files"),
    _p("p_G", 1.04e-4, "(ng/mL)*mm^3/(cells*h)", 0.0, 1.0, "cytokine",
       "IFN-γ release per engaged reactive effector", "calibrated: well-mixed prototype"),
    _p("D_X", 1.31e-8 * _UM2_PER_H_PER_CM2_PER_S, "um^2/h", 0.0, 1e8, "cytokine",
       "CXCL9/10 diffusivity (CCL2 proxy 1.31e-8 cm²/s)",
       "chosen: chemokine-class prior 1e-8–1e-6 cm²/s, CCL2 value (PARAMETERS.md)"),
    _p("lambda_X", 0.06, "1/h", 0.0, 100.0, "cytokine",
       "CXCL9/10 decay (CCL2 proxy t½ 11.5 h)", "chosen: CCL2 proxy (PARAMETERS.md)"),
    _p("p_X0", 0.20, "ng/(mL*h)", 0.0, 100.0, "cytokine",
       "baseline (IFN-γ-independent) CXCL production by tumour and stroma",
       "calibrated: inflamed preset (excluded 0.08, desert 0.02; PARAMETERS.md)",
       per_lesion=True),
    _p("p_X", 0.6, "ng/(mL*h)", 0.0, 100.0, "cytokine",
       "IFN-γ-induced CXCL production", "calibrated: well-mixed prototype"),
    _p("K_GX", 0.5, "ng/mL", 1e-6, 1e4, "cytokine",
       "IFN-γ half-saturation of CXCL induction", "calibrated: well-mixed prototype"),
    _p("s_X", 0.2, "1", 0.0, 100.0, "cytokine",
       "stromal share of CXCL production (per unit S)", "calibrated: well-mixed prototype"),
    _p("x_h", 0.093, "1", 0.0, 100.0, "cytokine",
       "host (myeloid/endothelial) CXCL production share, IFN-γ-driven only",
       "calibrated: well-mixed prototype"),
    _p("D_L", 4e-8 * _UM2_PER_H_PER_CM2_PER_S, "um^2/h", 0.0, 1e8, "cytokine",
       "IL-2 diffusivity (4e-8 cm²/s)",
       "spQSP GPU file; chosen the lower of 4e-8–1e-6 cm²/s (uptake dominates, PARAMETERS.md)"),
    _p("lambda_L", 0.1, "1/h", 0.0, 100.0, "cytokine",
       "IL-2 decay in tissue (2.78e-5 /s, t½ ≈ 7 h)", "spQSP parameter files"),
    _p("p_L", 1.5e-3, "(ng/mL)*mm^3/(cells*h)", 0.0, 1.0, "cytokine",
       "IL-2 release per engaged reactive effector", "calibrated: well-mixed prototype"),
    _p("u_L", 1e-3, "(ng/mL)*mm^3/(cells*h)", 0.0, 1.0, "cytokine",
       "IL-2 uptake per T cell (saturating in L/(L + K_L))", "calibrated: well-mixed prototype"),
    _p("D_B", 2.6e-7 * _UM2_PER_H_PER_CM2_PER_S, "um^2/h", 0.0, 1e8, "cytokine",
       "TGF-β diffusivity (2.6e-7 cm²/s)", "spQSP GPU file"),
    _p("lambda_B", 0.594, "1/h", 0.0, 100.0, "cytokine",
       "TGF-β decay (1.65e-4 /s, t½ ≈ 70 min)", "spQSP GPU file; QSP-IO 14.3 /day"),
    _p("p_B", 1.0, "ng/(mL*h)", 0.0, 100.0, "cytokine",
       "TGF-β production by tumour cells (×C/K_max)",
       "calibrated: well-mixed prototype", per_lesion=True),
    _p("p_BS", 1.02, "ng/(mL*h)", 0.0, 100.0, "cytokine",
       "TGF-β production by stroma (×S)", "calibrated: well-mixed prototype", per_lesion=True),
    _p("K_B", 3.5, "ng/mL", 1e-6, 1e4, "cytokine",
       "TGF-β level halving killing and expansion, Φ_B = 1/(1 + B/K_B)",
       "calibrated: well-mixed prototype; TGF-β half-max on Teff 0.14 nM (QSP-IO)"),
    # --------------------------------------------------------------------- pd1
    _p("P_0", 0.15, "1", 0.0, 1.0, "pd1",
       "baseline PD-L1 expression (fraction of full induction)",
       "Shin 2017; Garcia-Diaz 2017 (≈ 6-fold induction; PARAMETERS.md)", per_lesion=True),
    _p("P_max", 0.9, "1", 0.0, 1.0, "pd1",
       "PD-L1 expression at saturating IFN-γ", "Shin 2017; Garcia-Diaz 2017 (PARAMETERS.md)",
       per_lesion=True),
    _p("K_GP", 0.11, "ng/mL", 1e-6, 1e4, "pd1",
       "IFN-γ half-saturation of PD-L1 induction", "spQSP; QSP-IO (Shin 2017)"),
    _p("tau_P", 12.0, "h", 1e-3, 1e4, "pd1",
       "relaxation time of PD-L1 expression", "Garcia-Diaz 2017 (hours to a day)"),
    _p("rho_PDL1", 60.0, "molecules/um^2", 0.0, 1e4, "pd1",
       "synapse PD-L1 density of a fully induced tumour cell (Q = ρ·P·(1−θ₁)(1−θ₂))",
       "calibrated in 3-D (docs/model.md): Φ_PD ≈ 0.1 in the untreated hot core, so that "
       "anti-PD-1 separates hot from cold; the 2-D prototype used 17"),
    _p("Q_50", 6.0, "molecules/um^2", 1e-6, 1e4, "pd1",
       "PD-1/PD-L1 complex density of half-maximal suppression",
       "QSP-IO (Cheng 2013; Jafarnejad 2019)"),
    _p("n_PD", 2.0, "1", 0.1, 10.0, "pd1",
       "Hill exponent of PD-1 suppression H_PD = Qⁿ/(Qⁿ + Q_50ⁿ)", "QSP-IO (Jafarnejad 2019)"),
    # -------------------------------------------------------------------- drug
    _p("D_A", 25.0 * 3600.0, "um^2/h", 0.0, 1e8, "drug",
       "IgG antibody diffusivity in tumour (25 µm²/s)",
       "Thurber/Wittrup-type estimate; heterogeneous (Clauss & Jain 1990)"),
    _p("lambda_A", 0.02, "1/h", 0.0, 10.0, "drug",
       "antibody loss from tissue (lymphatic drainage, catabolism)",
       "calibrated: k_A = λ_A gives tissue:plasma ≈ 0.5 at V = 1 (QSP-IO TNBC)"),
    _p("k_A", 0.02, "1/h", 0.0, 10.0, "drug",
       "vessel exchange of antibody with plasma per unit vessel density",
       "calibrated: tissue:plasma ≈ 0.5 at V = 1 (QSP-IO TNBC)"),
    _p("K_D_PD1", 0.584, "ug/mL", 1e-6, 1e3, "drug",
       "anti-PD-1 dissociation constant (4 nM)", "QSP-IO (Wang 2014)"),
    _p("K_D_PDL1", 0.058, "ug/mL", 1e-6, 1e3, "drug",
       "anti-PD-L1 dissociation constant (0.4 nM)", "QSP-IO (Brown 2020)"),
    _p("K_D_CTLA4", 2.69, "ug/mL", 1e-6, 1e3, "drug",
       "anti-CTLA-4 dissociation constant (18.2 nM)", "QSP-IO (Brown 2020)"),
    # ------------------------------------------------------------------ tissue
    _p("K_max", 4e5, "cells/mm^3", 1e3, 1e7, "tissue",
       "packing capacity C + N + T + E + H (one cell ≈ 2,500 µm³)", "MODEL.md"),
    _p("tau_r", 12.0, "h", 1e-3, 1e5, "tissue",
       "relaxation time of the mixture-volume drift in the velocity balance",
       "chosen: removes round-off drift without acting on the biology (MODEL.md)"),
    _p("C_init_frac", 0.85, "1", 0.0, 1.0, "tissue",
       "initial viable tumour density inside a lesion, as a fraction of K_max",
       "calibrated: third 2-D check (0.8–0.9; a half-packed start spreads)"),
    _p("k_S", 0.0, "1/h", 0.0, 10.0, "tissue",
       "optional TGF-β-driven stroma deposition, k_S·B/(B + K_BS)·(1 − S) (off by default)",
       "chosen: off; the excluded preset may switch it on to keep its ring "
       "(TGF-β-activated fibroblasts, MODEL.md)", per_lesion=True),
    _p("K_BS", 3.5, "ng/mL", 1e-6, 1e4, "tissue",
       "TGF-β half-saturation of stroma deposition",
       "chosen: equal to K_B (same TGF-β receptor signalling)"),
    _p("lambda_S", _LN2 / (14.0 * _HOURS_PER_DAY), "1/h", 0.0, 10.0, "tissue",
       "turnover of deposited stroma (t½ 14 d)", "chosen: slow ECM turnover (weeks)"),
    _p("detect_frac", 0.1, "1", 0.0, 1.0, "tissue",
       "imaging detection threshold: voxels with C ≥ detect_frac·K_max form the RECIST mask",
       "chosen: edge of a packed lesion lies within a voxel of this contour"),
    _p("section_um", 14.0, "um", 0.0, 1000.0, "tissue",
       "section thickness + cell diameter converting cells/mm³ to cells/mm² (IHC)",
       "MODEL.md Readouts (4,400 cells/mm³ ≈ 60 cells/mm²)"),
    _p("tau_phen", 140.0, "cells/mm^2", 0.0, 1e5, "tissue",
       "CD8 threshold of the immunophenotype classifier (section-equivalent)",
       "calibrated: third 2-D check"),
    # ---------------------------------------------------------------- systemic
    _p("s_sh", 1e-4, "1/h", 0.0, 1.0, "systemic",
       "antigen shedding rate of viable cells (×a·C), added to killing in Ag(t)",
       "calibrated: well-mixed prototype"),
    _p("delta_Ag", 0.01, "1/h", 1e-6, 10.0, "systemic",
       "decay of the lymph-node antigen depot Ag_LN (t½ ≈ 2.9 d)",
       "chosen: antigen persists over days after release (MODEL.md)"),
    _p("K_Ag", 1e6, "cells", 1e-3, 1e15, "systemic",
       "half-saturation of naive priming in Ag_LN",
       "calibrated: prototype 1e4 cells/h ÷ delta_Ag (depot holds flux/delta_Ag at steady state)"),
    _p("k_pr", 0.98, "cells/(uL*h)", 0.0, 1e3, "systemic",
       "maximal naive priming flux into blood effectors",
       "calibrated: prototype 0.098 × 10 (third 2-D check, with f_spec 0.1)"),
    _p("e_C", 2.86, "1", 0.0, 100.0, "systemic",
       "priming enhancement by anti-CTLA-4 occupancy, (1 + e_C·θ_CTLA4)",
       "calibrated: well-mixed prototype"),
    _p("n_transit", 6.0, "1", 1.0, 50.0, "systemic",
       "number of transit compartments of the priming delay (integer; sets state shape)",
       "chosen: Erlang delay with a clear peak"),
    _p("tau_pr", 144.0, "h", 1.0, 1e4, "systemic",
       "mean priming delay (priming, expansion, differentiation)",
       "chosen: 6 d within 5–7 d (MODEL.md; second 2-D check)"),
    _p("delta_b", 0.01, "1/h", 0.0, 10.0, "systemic",
       "loss rate of blood effector cells", "chosen (PARAMETERS.md)"),
    _p("V_blood", 5e6, "uL", 1.0, 1e8, "systemic",
       "blood volume (5 L)", "chosen: adult (PARAMETERS.md)"),
    # ------------------------------------------------------------------ memory
    _p("f_M", 0.1, "1", 0.0, 1.0, "memory",
       "fraction of delayed priming output that becomes memory", "calibrated: prototype"),
    _p("k_rc", 0.005, "1/h", 0.0, 10.0, "memory",
       "recall rate per memory cell", "calibrated: prototype"),
    _p("g_rc", 10.0, "1", 0.0, 1e4, "memory",
       "effectors yielded per recalled memory cell (memory self-renews)",
       "calibrated: prototype"),
    _p("K_rc", 1e4, "cells", 1e-3, 1e15, "memory",
       "half-saturation of recall in Ag_LN (far below K_Ag)",
       "calibrated: prototype 100 cells/h ÷ delta_Ag"),
    _p("delta_M", _LN2 / (2.0 * _HOURS_PER_YEAR), "1/h", 0.0, 1.0, "memory",
       "memory loss rate (t½ 2 y)", "chosen (PARAMETERS.md)"),
    _p("M_max", 2.0, "cells/uL", 1e-6, 1e6, "memory",
       "memory capacity; caps recall at g_rc·k_rc·M_max = 0.1 cells/µL/h",
       "chosen: recall ≈ 10 % of k_pr, so memory speeds relapse control (K_rc ≪ K_Ag) "
       "without self-amplifying into rejection of cold tumours (MODEL.md)"),
    # --------------------------------------------------------------------- act
    _p("act_cells", 1e10, "cells", 0.0, 1e13, "act",
       "default ACT infusion size", "lifileucel label 7.5e9–7.2e10 cells; TIL 1e10–1e11"),
    _p("ld_before", 168.0, "h", 0.0, 2000.0, "act",
       "lymphodepletion window start before infusion",
       "cyclophosphamide/fludarabine from day −7 (Dudley 2005; lifileucel label)"),
    _p("ld_after", 336.0, "h", 0.0, 5000.0, "act",
       "lymphodepletion window end after infusion",
       "chosen: lymphopenia recovers over ~2 weeks"),
    _p("ld_r_T", 2.0, "1", 1.0, 100.0, "act",
       "factor raising r_T inside the lymphodepletion window",
       "chosen: homeostatic cytokines (IL-7/IL-15) rise after lymphodepletion"),
    _p("ld_delta_b", 0.5, "1", 0.0, 1.0, "act",
       "factor lowering delta_b inside the lymphodepletion window",
       "chosen: fewer competitors for homeostatic cytokines"),
    # -------------------------------------------------------------------- irae
    _p("k_R", 0.0015, "1/h", 0.0, 10.0, "irae",
       "irAE index build-up per unit blockade and T_b/T_ref",
       "calibrated: prototype (peak 3.3 nivo+ipi, 0.5 nivo)"),
    _p("w_C", 1.0, "1", 0.0, 100.0, "irae",
       "weight of anti-CTLA-4 occupancy in irAE drive", "calibrated: prototype"),
    _p("delta_R", _LN2 / (10.0 * _HOURS_PER_DAY), "1/h", 0.0, 10.0, "irae",
       "resolution rate of the irAE index (t½ 10 d)", "calibrated: prototype"),
    _p("T_ref", 40.0, "cells/uL", 1e-6, 1e6, "irae",
       "population reference blood effector level (not the patient's own baseline)",
       "chosen: ≈ T_b of an intermediate patient on anti-PD-1 after the ×10 priming "
       "rescale; recalibrate with cohorts"),
    _p("R_grade1", 1.0, "1", 0.0, 1e3, "irae",
       "irAE index threshold of grade 1 (grade = number of thresholds reached)",
       "calibrated: prototype grade = floor(R)"),
    _p("R_grade2", 2.0, "1", 0.0, 1e3, "irae", "irAE index threshold of grade 2",
       "calibrated: prototype grade = floor(R)"),
    _p("R_grade3", 3.0, "1", 0.0, 1e3, "irae", "irAE index threshold of grade 3",
       "calibrated: prototype grade = floor(R)"),
    _p("R_grade4", 4.0, "1", 0.0, 1e3, "irae", "irAE index threshold of grade 4",
       "calibrated: prototype grade = floor(R)"),
    _p("manage_irae", 1.0, "1", 0.0, 1.0, "irae",
       "management rule switch (1: hold checkpoint drugs and give steroids at hold_grade)",
       "Opdivo/Yervoy/Keytruda labels: withhold or discontinue for grade 3–4 irAEs"),
    _p("hold_grade", 3.0, "1", 1.0, 4.0, "irae",
       "irAE grade at which the management rule withholds checkpoint drugs and gives steroids",
       "drug labels (grade ≥ 3)"),
    _p("resume_grade", 1.0, "1", 0.0, 4.0, "irae",
       "irAE grade at or below which withheld checkpoint dosing resumes",
       "Opdivo/Yervoy/Keytruda labels: resume on recovery to grade 0–1"),
    _p("resume_steroid", 0.1, "1", 1e-3, 1.0, "irae",
       "steroid level s at or below which withheld dosing may resume (taper done)",
       "labels: resume once prednisone is ≤ 10 mg/day, ≈ 0.1 of a full 1–2 mg/kg/day"),
    _p("discontinue_grade", 4.0, "1", 1.0, 5.0, "irae",
       "irAE grade at which checkpoint drugs stop for good (5: never by grade)",
       "labels: permanently discontinue for grade 4 irAEs"),
    _p("resume_limit", 1.0, "1", 0.0, 100.0, "irae",
       "resumptions allowed (an integer); a hold after that many stops dosing for good "
       "(0: every hold)",
       "labels: permanently discontinue for a recurrent grade 3 irAE"),
    _p("resume_window_h", 2016.0, "h", 0.0, 1e6, "irae",
       "a hold not ready to resume (grade and taper) this long after it began stops dosing "
       "for good (12 weeks)",
       "labels: permanently discontinue if grade 0–1 or ≤ 10 mg/day prednisone is not "
       "reached within 12 weeks"),
    _p("steroid_R", 4.0, "1", 1.0, 100.0, "irae",
       "fold increase of irAE resolution under full corticosteroids",
       "chosen: documented proxy (most grade 3 irAEs resolve within weeks on steroids)"),
    _p("steroid_effector", 0.5, "1", 0.0, 1.0, "irae",
       "remaining effector activity under full corticosteroids (scales killing)",
       "chosen: steroids partly blunt effector function (MODEL.md: 'partly')"),
    _p("tau_steroid", 672.0, "h", 1.0, 1e5, "irae",
       "steroid taper time constant (4 weeks)",
       "labels: prednisone 1–2 mg/kg/day tapered over at least 1 month"),
    # ---------------------------------------------------------------- numerics
    _p("dt_max", 0.5, "h", 1e-6, 24.0, "numerics",
       "upper cap of the automatic time step",
       "chosen: reactions accurate to ~1 % with explicit steps of 0.05–0.5 h (MODEL.md)"),
)

TABLE: dict[str, Parameter] = {p.symbol: p for p in PARAMETERS}


def _check_table() -> None:
    # The table is code: a duplicate symbol or a default outside its own range
    # is a programming error caught at import, not a config error.
    if len(TABLE) != len(PARAMETERS):
        raise RuntimeError("duplicate symbols in the parameter table")
    for p in PARAMETERS:
        if p.group not in GROUPS:
            raise RuntimeError(f"{p.symbol}: unknown group {p.group!r}")
        if not (p.low <= p.value <= p.high):
            raise RuntimeError(f"{p.symbol}: default {p.value} outside [{p.low}, {p.high}]")


_check_table()


def default_values() -> dict[str, float]:
    """Every symbol's default value in core units."""
    return {p.symbol: p.value for p in PARAMETERS}


def _close_matches(symbol: str) -> str:
    lowered = {s.lower(): s for s in TABLE}
    matches = difflib.get_close_matches(symbol.lower(), list(lowered), n=4, cutoff=0.6)
    return ", ".join(lowered[m] for m in matches)


def _validate_one(symbol: Any, value: Any, prefix: str) -> tuple[str, float]:
    key = f"{prefix}.{symbol}"
    if not isinstance(symbol, str) or symbol not in TABLE:
        close = _close_matches(str(symbol))
        hint = f"did you mean {close}?" if close else "see docs/parameters.md"
        raise ConfigError(key, value, "a known parameter symbol", hint=hint)
    parameter = TABLE[symbol]
    # Antibody concentrations are µg/mL; an affinity given in nM converts at IgG mass.
    molar_mass = IGG_MOLAR_MASS_G_PER_MOL if parameter.units == "ug/mL" else None
    number = convert(value, parameter.units, key, molar_mass_g_per_mol=molar_mass)
    if not (parameter.low <= number <= parameter.high):
        units = "" if parameter.units == "1" else f" {parameter.units}"
        raise ConfigError(key, value, f"a value in [{parameter.low:g}, {parameter.high:g}]{units}")
    return symbol, number


def validate_overrides(
    overrides: Mapping[str, float | str] | None, prefix: str = "tme.params", per_lesion: bool = False
) -> dict[str, float]:
    """Check and convert parameter overrides from a config.

    Args:
        overrides: symbol → number (core units) or string with units ("25 um^2/s").
        prefix: config path of the mapping, used in error messages.
        per_lesion: the mapping is one lesion's: only per-lesion symbols are
            allowed (the patient-level relations are checked on the patient's).

    Returns:
        symbol → value in core units (only the given symbols).

    Raises:
        ConfigError: unknown symbol (with close matches), unreadable or
            wrong-dimension units, or a value outside the valid range.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(prefix, overrides, "a mapping of parameter symbol to value")
    validated = dict(_validate_one(symbol, value, prefix) for symbol, value in overrides.items())
    if per_lesion:
        for symbol in validated:
            if not TABLE[symbol].per_lesion:
                allowed = ", ".join(p.symbol for p in PARAMETERS if p.per_lesion)
                raise ConfigError(f"{prefix}.{symbol}", overrides[symbol],
                                  f"a per-lesion parameter ({allowed})",
                                  hint=f"set {symbol} for the patient")
        return validated
    _check_irae_rule(validated, prefix)
    return validated


def _check_irae_rule(validated: Mapping[str, float], prefix: str) -> None:
    """The management rule's grades must nest, resume_grade < hold_grade ≤
    discontinue_grade, and resume_limit count whole resumptions; the error
    names an overridden symbol of the offending pair."""
    values = {**default_values(), **validated}
    if "resume_limit" in validated and not float(validated["resume_limit"]).is_integer():
        raise ConfigError(f"{prefix}.resume_limit", validated["resume_limit"],
                          "a whole number of resumptions")

    def ordered(low: str, high: str, strict: bool) -> None:
        fine = values[low] < values[high] if strict else values[low] <= values[high]
        if fine:
            return
        relation = "<" if strict else "≤"
        if low in validated:
            raise ConfigError(f"{prefix}.{low}", validated[low],
                              f"a grade {relation} {high} ({values[high]:g})")
        raise ConfigError(f"{prefix}.{high}", validated[high],
                          f"a grade {'>' if strict else '≥'} {low} ({values[low]:g})")

    ordered("resume_grade", "hold_grade", strict=True)
    ordered("hold_grade", "discontinue_grade", strict=False)


@pytree_dataclass
class ModelParams:
    """All model parameters as array leaves (a pytree; numbers never recompile).

    Attributes:
        values: symbol → 0-d array, or shape ``(lesions,)`` for per-lesion
            parameters (:attr:`Parameter.per_lesion`), in core units.

    ``params["k_kill"]`` reads a value.
    """

    values: dict[str, jax.Array]

    def __getitem__(self, symbol: str) -> jax.Array:
        return self.values[symbol]

    def __contains__(self, symbol: object) -> bool:
        return symbol in self.values

    @property
    def lesions(self) -> int:
        """Number of lesions (length of the per-lesion axis)."""
        per_lesion = [p.symbol for p in PARAMETERS if p.per_lesion]
        return int(self.values[per_lesion[0]].shape[0]) if per_lesion else 1

    def with_values(self, **changes: Any) -> ModelParams:
        """A copy with some values replaced (no validation: for sweeps inside code)."""
        unknown = sorted(set(changes) - set(self.values))
        if unknown:
            raise KeyError(f"unknown parameter symbols: {unknown}")
        values = dict(self.values)
        for symbol, value in changes.items():
            values[symbol] = jnp.asarray(value, dtype=self.values[symbol].dtype)
        return ModelParams(values=values)


def make_params(
    overrides: Mapping[str, float | str] | None = None,
    lesion_overrides: Sequence[Mapping[str, float | str]] | None = None,
    lesions: int = 1,
    dtype: Any = jnp.float32,
    prefix: str = "tme.params",
) -> ModelParams:
    """Build :class:`ModelParams` from the defaults, patient-level and per-lesion overrides.

    Args:
        overrides: symbol → value for the patient (validated, units converted).
        lesion_overrides: one mapping per lesion (length ``lesions``) of
            per-lesion symbols only; they win over ``overrides`` for that lesion.
        lesions: number of lesions (per-lesion leaves have shape ``(lesions,)``).
        dtype: floating dtype of the leaves (float32 by default; float64 needs
            ``jax_enable_x64``).
        prefix: config path for error messages.

    Raises:
        ConfigError: any invalid override, a per-lesion mapping for a
            patient-level symbol, or a list whose length is not ``lesions``.
    """
    if isinstance(lesions, bool) or not isinstance(lesions, int) or lesions < 1:
        raise ConfigError("lesions", lesions, "a positive integer")
    base = default_values()
    base.update(validate_overrides(overrides, prefix))
    per_lesion_values = {p.symbol: [base[p.symbol]] * lesions for p in PARAMETERS if p.per_lesion}
    if lesion_overrides is not None:
        lesion_key = prefix.rsplit(".", 1)[0] + ".lesions"
        if len(lesion_overrides) != lesions:
            raise ConfigError(lesion_key, len(lesion_overrides),
                              f"one mapping of per-lesion parameters per lesion ({lesions})")
        for index, mapping in enumerate(lesion_overrides):
            lesion_prefix = f"{lesion_key}.{index}"
            for symbol, value in validate_overrides(mapping, lesion_prefix, per_lesion=True).items():
                per_lesion_values[symbol][index] = value
    values: dict[str, jax.Array] = {}
    for p in PARAMETERS:
        if p.per_lesion:
            values[p.symbol] = jnp.asarray(per_lesion_values[p.symbol], dtype=dtype)
        else:
            values[p.symbol] = jnp.asarray(base[p.symbol], dtype=dtype)
    return ModelParams(values=values)


def _format_number(value: float) -> str:
    if value == 0.0:
        return "0"
    if value in (_INF, -_INF):
        return "∞" if value > 0 else "−∞"
    return f"{value:.4g}"


def render_parameters_markdown() -> str:
    """The parameter table as Markdown, grouped (the content of docs/parameters.md)."""
    lines = [
        "# Parameters",
        "",
        "Generated by `python -m tmesolve.model.parameters` from",
        "`tmesolve/model/parameters.py`; do not edit by hand (a test checks it is current).",
        "",
        "Core units: length µm, time h, cell densities cells/mm³ (1 cell/µL = 1 cell/mm³),",
        "cytokines ng/mL, antibodies µg/mL, oxygen mmHg, drug amounts mg. Config values may",
        'be given with units as strings ("25 um^2/s"); they are converted to the units below.',
        "Per-lesion parameters (marked ✓) may differ between the lesions of one patient.",
        "",
    ]
    for group in GROUPS:
        members = [p for p in PARAMETERS if p.group == group]
        if not members:
            continue
        lines += [f"## {_GROUP_TITLES[group]} (`{group}`)", ""]
        lines += ["| symbol | description | value | units | range | per lesion | source |",
                  "|---|---|---|---|---|---|---|"]
        for p in members:
            cells = [
                f"`{p.symbol}`",
                p.description,
                _format_number(p.value),
                p.units,
                f"[{_format_number(p.low)}, {_format_number(p.high)}]",
                "✓" if p.per_lesion else "",
                p.source,
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def default_markdown_path() -> Path:
    """``docs/parameters.md`` at the repository root."""
    return Path(__file__).resolve().parents[2] / "docs" / "parameters.md"


def write_parameters_markdown(path: str | Path | None = None) -> Path:
    """Write the parameter table to ``path`` (default ``docs/parameters.md``)."""
    target = Path(path) if path is not None else default_markdown_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_parameters_markdown(), encoding="utf-8")
    return target


if __name__ == "__main__":
    print(f"wrote {write_parameters_markdown()}")
