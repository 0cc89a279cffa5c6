"""The parameter table, config validation, ModelParams and the unit converter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmesolve.errors import ConfigError
from tmesolve.model import parameters
from tmesolve.model.parameters import (
    GROUPS,
    PARAMETERS,
    TABLE,
    ModelParams,
    default_values,
    make_params,
    render_parameters_markdown,
    validate_overrides,
)
from tmesolve.units import conversion_factor, convert, parse_units

# Every symbol the equations of MODEL.md ("Key terms", "Systemic compartment",
# "Extinction", "Readouts") use, in the ASCII spelling of the table.
REQUIRED = """
r_C K_C k_kill k_nec O_n n_hyp lambda_N D_C D_T chi_0 K_chi s_m K_Bm K_B k_in alpha_0
alpha_X K_X r_T K_L k_ex k_re delta_T delta_E f_spec K_max tau_r D_O lambda_O k_V O_b
u_C u_T K_Ou K_O D_G lambda_G p_G D_X lambda_X p_X0 p_X K_GX s_X x_h D_L lambda_L p_L
u_L D_B lambda_B p_B p_BS P_0 P_max K_GP tau_P rho_PDL1 Q_50 n_PD D_A lambda_A k_A
K_D_PD1 K_D_PDL1 K_D_CTLA4 s_sh K_Ag k_pr e_C TMB_0 TMB delta_Ag n_transit tau_pr f_M k_rc
g_rc K_rc delta_M M_max delta_b V_blood k_R w_C delta_R T_ref R_grade1 R_grade2
R_grade3 R_grade4 manage_irae hold_grade steroid_R steroid_effector tau_steroid
ld_before ld_after ld_r_T ld_delta_b act_cells n_ext k_S K_BS lambda_S c_crowd
detect_frac section_um tau_phen C_init_frac
""".split()


def test_table_covers_every_model_symbol():
    missing = [s for s in REQUIRED if s not in TABLE]
    assert missing == []


def test_every_entry_is_complete_and_in_range():
    for p in PARAMETERS:
        assert p.low <= p.value <= p.high, p.symbol
        assert p.group in GROUPS, p.symbol
        assert p.source.strip() and p.description.strip(), p.symbol
        parse_units(p.units)  # every unit string is readable by the converter
        assert p.symbol.isascii() and p.symbol.isidentifier(), p.symbol


def test_converted_defaults_match_parameters_md():
    values = default_values()
    # PARAMETERS.md values in their published units, converted here (exact conversions).
    assert values["D_O"] == pytest.approx(convert("1e5 um^2/min", "um^2/h", "D_O"), rel=1e-12)
    assert values["lambda_O"] == pytest.approx(convert("0.1 1/min", "1/h", "x"), rel=1e-12)
    assert values["D_A"] == pytest.approx(convert("25 um^2/s", "um^2/h", "x"), rel=1e-12)
    assert values["D_G"] == pytest.approx(convert("1e-7 cm^2/s", "um^2/h", "x"), rel=1e-12)
    assert values["lambda_G"] == pytest.approx(convert("6.5e-5 1/s", "1/h", "x"), rel=1e-12)
    assert values["delta_R"] == pytest.approx(math.log(2) / 240.0, rel=1e-12)
    assert values["K_max"] == 4e5 and values["Q_50"] == 6.0
    # rho_PDL1 (17 in PARAMETERS.md) was recalibrated in 3-D: docs/model.md.
    assert values["rho_PDL1"] == 60.0


def test_unknown_symbol_is_refused_with_close_matches():
    with pytest.raises(ConfigError) as error:
        validate_overrides({"k_kil": 0.1})
    message = str(error.value)
    assert "tme.params.k_kil" in message and "k_kill" in message


def test_out_of_range_names_symbol_and_range():
    with pytest.raises(ConfigError) as error:
        validate_overrides({"s_m": 1.5}, prefix="patient.params")
    message = str(error.value)
    assert "patient.params.s_m" in message and "[0, 1]" in message


def test_wrong_units_are_refused():
    with pytest.raises(ConfigError) as error:
        validate_overrides({"D_T": "1 mg"})
    assert "tme.params.D_T" in str(error.value) and "um^2/h" in str(error.value)


def test_strings_with_units_are_converted():
    result = validate_overrides({"D_T": "10 um^2/min", "tau_pr": "6 d", "K_D_PD1": "4 nM"})
    assert result["D_T"] == pytest.approx(600.0, rel=1e-12)
    assert result["tau_pr"] == pytest.approx(144.0, rel=1e-12)
    # 4 nM of a 146 kDa IgG is 0.584 µg/mL (QSP-IO's value).
    assert result["K_D_PD1"] == pytest.approx(0.584, rel=1e-12)


def test_make_params_shapes_and_lesion_overrides():
    params = make_params({"k_kill": 0.2}, lesion_overrides=[{"TMB": 2.0}, {"f_spec": "0.2"}],
                         lesions=2)
    assert params["k_kill"].shape == () and float(params["k_kill"]) == pytest.approx(0.2)
    assert params["TMB"].shape == (2,)
    assert params["TMB"].tolist() == [2.0, TABLE["TMB"].value]
    assert params["f_spec"].tolist() == pytest.approx([0.1, 0.2])
    assert params.lesions == 2
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(params))
    assert params["D_O"].dtype == jnp.float32


def test_lesion_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"tme\.lesions\.0\.k_kill"):
        make_params(lesion_overrides=[{"k_kill": 0.2}], lesions=1)
    with pytest.raises(ConfigError, match="tme.lesions"):
        make_params(lesion_overrides=[{}, {}], lesions=3)
    with pytest.raises(ConfigError, match=r"tme\.lesions\.1\.f_spec"):
        make_params(lesion_overrides=[{}, {"f_spec": 2.0}], lesions=2)


def test_changing_a_number_does_not_recompile():
    traces = []

    @jax.jit
    def growth(params: ModelParams) -> jax.Array:
        traces.append(1)
        return params["k_kill"] * params["K_max"]

    first = growth(make_params())
    second = growth(make_params({"k_kill": 0.5}))  # the default is 0.3
    assert len(traces) == 1
    assert float(second) > float(first)


def test_docs_parameters_md_is_current():
    path = parameters.default_markdown_path()
    assert path.read_text(encoding="utf-8") == render_parameters_markdown(), (
        "docs/parameters.md is stale: run `python -m tmesolve.model.parameters`")


# ---------------------------------------------------------------- unit converter


def test_unit_conversions():
    assert convert("1e5 um^2/min", "um^2/h", "k") == pytest.approx(6e6, rel=1e-12)
    assert convert("22 d", "h", "k") == pytest.approx(528.0, rel=1e-12)
    assert convert("3 wk", "h", "k") == pytest.approx(504.0, rel=1e-12)
    assert convert("5 L", "uL", "k") == pytest.approx(5e6, rel=1e-12)
    assert convert("0.03 mmHg*mm^3/cells/h", "mmHg mm^3/(cells*h)", "k") == pytest.approx(0.03)
    assert convert("2 µm²·s⁻¹", "um^2/h", "k") == pytest.approx(7200.0, rel=1e-12)
    assert convert("1 ug/mL", "ng/mL", "k") == pytest.approx(1000.0, rel=1e-12)
    assert convert(0.5, "1/h", "k") == 0.5  # numbers are already in core units


@pytest.mark.parametrize("value", ["1 mg", "2 cells/mm^3", "1 um^2"])
def test_incompatible_units_are_refused(value):
    with pytest.raises(ConfigError) as error:
        convert(value, "um^2/h", "tme.params.D_T")
    assert str(error.value).startswith("tme.params.D_T: got")
    assert "a quantity in um^2/h" in str(error.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan um", "inf h", "fast", True, None])
def test_non_finite_and_unreadable_values_are_refused(value):
    with pytest.raises(ConfigError):
        convert(value, "h", "key")


def test_molar_conversion_needs_a_molar_mass():
    with pytest.raises(ConfigError):
        convert("4 nM", "ug/mL", "K_D")
    assert convert("4 nM", "ug/mL", "K_D", molar_mass_g_per_mol=1.46e5) == pytest.approx(0.584)


_UNITS = ["um^2/h", "mm^2/d", "cm^2/s", "m^2/min", "um^2/wk"]


@settings(max_examples=60, deadline=None)
@given(value=st.floats(1e-6, 1e9, allow_nan=False), source=st.sampled_from(_UNITS),
       target=st.sampled_from(_UNITS))
def test_conversion_round_trip(value, source, target):
    there = convert(f"{value!r} {source}", target, "k")
    back = convert(f"{there!r} {target}", source, "k")
    # Each conversion rounds to 14 significant digits; two of them stay within 1e-12.
    assert back == pytest.approx(value, rel=1e-12)
    assert conversion_factor(source, target) * conversion_factor(target, source) == pytest.approx(
        1.0, rel=1e-12)
