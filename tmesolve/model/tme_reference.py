"""A plain, readable reference of the TME model's local right-hand side (NumPy).

Written term by term from MODEL.md ('Key terms'), one field at a time, with
no splitting into production and loss and no fusion. The compiled model
(:meth:`tmesolve.model.tme.TMEModel.local_terms`) must agree with it to
round-off on any state; the tests check that. Also the systemic ODEs of
MODEL.md ('Systemic compartment') as a right-hand side for ``solve_ivp``.
"""

from __future__ import annotations

import numpy as np


def hill(x, half, n=1.0):
    return x**n / (x**n + half**n)


def local_rates(u: dict[str, np.ndarray], p: dict[str, np.ndarray], T_b: float, plasma: np.ndarray,
                steroid_factor: float = 1.0, r_T_factor: float = 1.0) -> dict[str, np.ndarray]:
    """du/dt of the local terms (no transport; the fast species' decay λ only for oxygen) per field.

    ``u`` maps symbols (C, N, T, E, H, O, G, X, L, B, P, A1, A2, V, S, a) to
    arrays of one shape; ``p`` maps parameter symbols to numbers (per-lesion
    parameters already broadcast); ``plasma`` is (3,) µg/mL (PD1, PDL1, CTLA4).
    """
    C, N, T, E, O = u["C"], u["N"], u["T"], u["E"], u["O"]
    G, X, L, B, P = u["G"], u["X"], u["L"], u["B"], u["P"]
    V, S, a = u["V"], u["S"], u["a"]
    T_star = p["f_spec"] * T                                   # tumour-reactive effectors
    theta_1 = u["A1"] / (u["A1"] + p["K_D_PD1"])               # anti-PD-1 occupancy
    theta_2 = u["A2"] / (u["A2"] + p["K_D_PDL1"])              # anti-PD-L1 occupancy
    theta = 1 - (1 - theta_1) * (1 - theta_2)
    Q = p["rho_PDL1"] * P * (1 - theta_1) * (1 - theta_2)      # engaged PD-L1, molecules/µm²
    H_PD = hill(Q, p["Q_50"], p["n_PD"])
    Phi_PD = 1 - H_PD
    Phi_B = 1 / (1 + B / p["K_B"])
    Phi_O = O / (O + p["K_O"])
    sigma_hyp = p["O_n"] ** p["n_hyp"] / (p["O_n"] ** p["n_hyp"] + O ** p["n_hyp"])
    e = a * C / (C + p["K_C"])
    phi = (C + N + T + E) / p["K_max"]
    room = np.maximum(1 - phi, 0)
    c_T = 1 - p["c_crowd"] * np.minimum(phi, 1)

    killing = p["k_kill"] * e * Phi_PD * Phi_B * Phi_O * T_star * steroid_factor
    dC = p["r_C"] * Phi_O * C * room - killing - p["k_nec"] * sigma_hyp * C
    dN = p["k_nec"] * sigma_hyp * C - p["lambda_N"] * N
    extravasation = (p["k_in"] * V * T_b * (p["alpha_0"] + p["alpha_X"] * X / (X + p["K_X"]))
                     / (1 + B / p["K_Bm"]) * c_T)
    expansion = p["r_T"] * r_T_factor * L / (L + p["K_L"]) * e * Phi_B * T_star * room * steroid_factor
    exhaustion = p["k_ex"] * H_PD * e * T_star
    dT = extravasation + expansion - exhaustion + p["k_re"] * theta * E - p["delta_T"] * T
    dE = exhaustion - p["k_re"] * theta * E - p["delta_E"] * E
    dO = (p["k_V"] * V * (p["O_b"] - O) - (p["u_C"] * C + p["u_T"] * (T + E)) * O / (O + p["K_Ou"])
          - p["lambda_O"] * O)
    engaged = e * Phi_PD * T_star * steroid_factor
    dG = p["p_G"] * engaged
    G_signal = G / (G + p["K_GX"])
    dX = (p["p_X0"] + p["p_X"] * G_signal) * (C / p["K_max"] + p["s_X"] * S) + p["p_X"] * p["x_h"] * G_signal
    dL = p["p_L"] * engaged - p["u_L"] * (T + E) * L / (L + p["K_L"])
    dB = p["p_B"] * C / p["K_max"] + p["p_BS"] * S
    dP = (p["P_0"] + (p["P_max"] - p["P_0"]) * G / (G + p["K_GP"]) - P) / p["tau_P"]
    dA1 = p["k_A"] * V * (plasma[0] - u["A1"])
    dA2 = p["k_A"] * V * (plasma[1] - u["A2"])
    dS = p["k_S"] * B / (B + p["K_BS"]) * np.maximum(1 - S, 0) - (p["lambda_S"] if p["k_S"] > 0 else 0.0) * S
    zero = np.zeros_like(C)
    return {"C": dC, "N": dN, "T": dT, "E": dE, "H": zero, "O": dO, "G": dG, "X": dX, "L": dL, "B": dB,
            "P": dP, "A1": dA1, "A2": dA2, "V": zero, "S": dS, "a": zero,
            "_killing": killing, "_extravasation": extravasation}
