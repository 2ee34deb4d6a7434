"""Fixed facts about MEx and the names used everywhere in the project."""

from __future__ import annotations

#: Modality order, fixed everywhere (batch dicts, masks, fusion nodes).
MODALITIES: tuple[str, ...] = ("act", "acw", "dc", "pm")

#: Folder of each modality inside the MEx archive.
FOLDERS: dict[str, str] = {
    "act": "act",
    "acw": "acw",
    "dc": "dc_0.05_0.05",
    "pm": "pm_1.0_1.0",
}

#: Values per row after the timestamp column (x, y, z or the flattened frame).
CHANNELS: dict[str, int] = {"act": 3, "acw": 3, "dc": 192, "pm": 512}

#: Columns per CSV row, timestamp included.
NUM_COLUMNS: dict[str, int] = {m: c + 1 for m, c in CHANNELS.items()}

#: Per-step shape of one sample of each modality (frames are reshaped row-major).
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "act": (3,),
    "acw": (3,),
    "dc": (12, 16),
    "pm": (32, 16),
}

#: Accelerometer modalities (resampled at ``acc_hz``); the others are frames (``frame_hz``).
ACC_MODALITIES: tuple[str, ...] = ("act", "acw")
FRAME_MODALITIES: tuple[str, ...] = ("dc", "pm")

NUM_CLASSES = 7
SUBJECTS: tuple[int, ...] = tuple(range(1, 31))
EXERCISES: tuple[int, ...] = tuple(range(1, 8))
#: The exercises by class index (exercise id - 1), as the MEx paper names them (Wijekoon et al., 2019); exercise 4
#: (the clam) is recorded twice, once on each side.
EXERCISE_NAMES: tuple[str, ...] = ("knee rolling", "bridging", "pelvic tilt", "the clam",
                                   "repeated extension in lying", "prone punch", "superman")

#: Sampling rates the sensors were set to (Hz): the accelerometers 100, depth camera and pressure mat 15 (the
#: depth camera delivers 8.3-12 Hz in practice, docs/data.md). New recordings should come close (model.predict).
RECORDED_HZ: dict[str, float] = {"act": 100.0, "acw": 100.0, "dc": 15.0, "pm": 15.0}

#: UCI Machine Learning Repository archive of MEx (doi:10.24432/C59K6T).
MEX_URL = "https://archive.ics.uci.edu/static/public/500/mex.zip"
#: sha256 of the MEx data archive (the zip whose root holds the four modality folders).
#: If the download wraps that archive in an outer zip, the inner one is checked.
MEX_SHA256 = "544c39adc383204706fe7371a4693be4385a5f5f18d7fed1c9cac1c9eacd06e3"
#: File name of the downloaded (and verified) archive inside the cache folder.
MEX_ZIP_NAME = "MEx.zip"

#: Environment variables understood by the package.
ENV_DATA_PATH = "FEDTIME_DATA_PATH"
ENV_CACHE_DIR = "FEDTIME_CACHE_DIR"
ENV_MEX_URL = "FEDTIME_MEX_URL"
ENV_MEX_SHA256 = "FEDTIME_MEX_SHA256"

#: Bump when the preprocessing code changes what ends up in the window cache.
CACHE_FORMAT_VERSION = 1

#: Default sigma of the training-only Gaussian noise augmentation, when enabled.
DEFAULT_AUGMENT_SIGMA = 0.01
