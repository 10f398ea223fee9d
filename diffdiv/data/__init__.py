"""Embedded and user data: mixtures, digits, image folders, prompt files."""

from diffdiv.data.digits import load_digits_tensor
from diffdiv.data.images import load_image_folder, save_image_grid
from diffdiv.data.mixtures import MixtureConfig, build_mixture, mixture_sigma_data
from diffdiv.data.prompts import PromptBank, encode_in_batches, load_prompts

__all__ = ["MixtureConfig", "build_mixture", "mixture_sigma_data", "load_digits_tensor", "load_image_folder",
           "save_image_grid", "load_prompts", "PromptBank", "encode_in_batches"]
