"""Evaluation: metrics, fold statistics, calibration and referral, plots, Grad-CAM, and the evaluate stage."""
