//! `[inference]` (the ONNX Runtime library, execution provider, threads and batching) and
//! `[models.NAME]` (one table per model that `detect:NAME` runs): typed, with defaults that
//! depend on the model's family, validated at load so a bad key is named at startup.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `[inference]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// The ONNX Runtime shared library (`libonnxruntime.so.1.x`). Default: `ORT_DYLIB_PATH`,
    /// else the standard places (see [`super::runtime::candidates`]).
    #[serde(default)]
    pub library: Option<PathBuf>,
    /// `cpu` (default), `cuda` or `tensorrt`: the execution provider asked for. A GPU provider
    /// that cannot start falls back to the CPU, logged and shown in `/healthz`.
    #[serde(default)]
    pub provider: Provider,
    /// The GPU the CUDA / TensorRT provider uses. Default 0.
    #[serde(default)]
    pub device_id: i32,
    /// Threads ONNX Runtime uses inside one model run (intra-op). Default 1.
    #[serde(default = "one")]
    pub threads: usize,
    /// Frames per model run at most (frames from all cameras, same input size). Default 1;
    /// raise it on a GPU (see docs/inference.md).
    #[serde(default = "one")]
    pub batch: usize,
    /// How long a model waits for its batch to fill after the first frame, ms. Default 2.
    #[serde(default = "two")]
    pub batch_wait_ms: u64,
}

fn one() -> usize {
    1
}
fn two() -> u64 {
    2
}

impl Default for InferenceConfig {
    fn default() -> Self {
        framelink_common::config_file::from_toml_str("").expect("defaults")
    }
}

/// `inference.provider`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl TryFrom<String> for Provider {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "tensorrt" => Ok(Self::TensorRt),
            _ => Err(format!("{s:?} is not \"cpu\", \"cuda\" or \"tensorrt\"")),
        }
    }
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        }
    }
}

/// What a model is, which decides its pre- and post-processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Family {
    /// Ultralytics YOLOv5 / v8-style detectors: letterbox, decode, class-aware NMS.
    Yolo,
    /// DBNet text detectors (PaddleOCR): probability map → boxes.
    Dbnet,
    /// Image classifiers: (softmax) top-k.
    Classify,
}

impl TryFrom<String> for Family {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "yolo" => Ok(Self::Yolo),
            "dbnet" => Ok(Self::Dbnet),
            "classify" => Ok(Self::Classify),
            _ => Err(format!("{s:?} is not \"yolo\", \"dbnet\" or \"classify\"")),
        }
    }
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Yolo => "yolo",
            Self::Dbnet => "dbnet",
            Self::Classify => "classify",
        }
    }
}

/// The channel order a model expects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    /// OpenCV-trained models (PaddleOCR's among them).
    Bgr,
}

/// `[models.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The `.onnx` file.
    pub path: PathBuf,
    /// `yolo`, `dbnet` or `classify`.
    pub family: Family,
    /// Reported in events. Default: the model's own `model_version` when set, else "unversioned".
    #[serde(default)]
    pub version: Option<String>,
    /// Input width and height for `yolo` and `classify`. Default: the model's input shape when
    /// fixed, else 640x640 (yolo).
    #[serde(default)]
    pub input_size: Option<[u32; 2]>,
    /// `dbnet`: the longer side is shrunk to at most this (then both rounded to multiples of
    /// 32). Default 960.
    #[serde(default = "default_max_side")]
    pub max_side: u32,
    /// `dbnet`: a frame whose shorter side is below this is first enlarged to it (RapidOCR
    /// runs PP-OCR's detector at 736); 0 = never enlarge. Default 0.
    #[serde(default)]
    pub min_side: u32,
    /// `rgb` (default) or `bgr`.
    #[serde(default)]
    pub channels: ChannelOrder,
    /// Per channel, subtracted from pixel/255. Default: yolo 0, dbnet ImageNet's, classify 0.5.
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    /// Per channel, divides (pixel/255 - mean). Default: yolo 1, dbnet ImageNet's, classify 0.5.
    #[serde(default)]
    pub std: Option<[f32; 3]>,
    /// Class names by class id. Default: the model's `names` metadata (Ultralytics exports),
    /// else `text` (dbnet) or `class_<id>`.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Only these labels are reported (empty: all).
    #[serde(default)]
    pub only_labels: Vec<String>,
    /// Detections scoring below this are not reported; a frame with none left makes no event.
    /// Default: yolo 0.25, dbnet 0.5, classify 0.5.
    #[serde(default)]
    pub min_score: Option<f32>,
    /// `yolo`: boxes of one class overlapping more than this (IoU) are suppressed. Default 0.45.
    #[serde(default = "default_nms_iou")]
    pub nms_iou: f32,
    /// At most this many detections per frame (highest scores first). Default 100.
    #[serde(default = "default_max_detections")]
    pub max_detections: usize,
    /// `dbnet`: a pixel is text when its probability is above this. Default 0.3.
    #[serde(default = "default_pixel_threshold")]
    pub pixel_threshold: f32,
    /// `dbnet`: how far a region's box is grown (area × ratio / perimeter). Default 1.5.
    #[serde(default = "default_unclip_ratio")]
    pub unclip_ratio: f32,
    /// `dbnet`: regions whose shorter side is below this (model pixels) are dropped. Default 3.
    #[serde(default = "default_min_box_size")]
    pub min_box_size: u32,
    /// `classify`: how many classes to report at most. Default 5.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// `classify`: apply softmax to the output (false when the model outputs probabilities).
    /// Default true.
    #[serde(default = "yes")]
    pub softmax: bool,
    /// Draw boxes and labels into the result image. Default false.
    #[serde(default)]
    pub draw: bool,
}

fn default_max_side() -> u32 {
    960
}
fn default_nms_iou() -> f32 {
    0.45
}
fn default_max_detections() -> usize {
    100
}
fn default_pixel_threshold() -> f32 {
    0.3
}
fn default_unclip_ratio() -> f32 {
    1.5
}
fn default_min_box_size() -> u32 {
    3
}
fn default_top_k() -> usize {
    5
}
fn yes() -> bool {
    true
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl ModelConfig {
    pub fn min_score(&self) -> f32 {
        self.min_score.unwrap_or(match self.family {
            Family::Yolo => 0.25,
            Family::Dbnet | Family::Classify => 0.5,
        })
    }

    /// (mean, std) per channel, in the model's channel order.
    pub fn normalization(&self) -> ([f32; 3], [f32; 3]) {
        let (m, s) = match self.family {
            Family::Yolo => ([0.0; 3], [1.0; 3]),
            Family::Dbnet => (IMAGENET_MEAN, IMAGENET_STD),
            Family::Classify => ([0.5; 3], [0.5; 3]),
        };
        (self.mean.unwrap_or(m), self.std.unwrap_or(s))
    }

    /// Checks the keys of `[models.NAME]`; errors name the key.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let key = |k: &str| format!("config key `models.{name}.{k}`");
        if framelink_common::pipeline::ModelName::new(name).is_none() {
            return Err(format!("config table `[models.{name}]`: model names are 1 to 32 of A-Z a-z 0-9 _ -"));
        }
        if !self.path.is_file() {
            return Err(format!("{}: {} is not a file", key("path"), self.path.display()));
        }
        if let Some([w, h]) = self.input_size
            && (!(1..=8192).contains(&w) || !(1..=8192).contains(&h))
        {
            return Err(format!("{}: [{w}, {h}] is not within 1..=8192", key("input_size")));
        }
        if !(32..=8192).contains(&self.max_side) {
            return Err(format!("{}: {} is not from 32 to 8192", key("max_side"), self.max_side));
        }
        if self.min_side > self.max_side {
            return Err(format!("{}: {} is above max_side ({})", key("min_side"), self.min_side, self.max_side));
        }
        if let Some(s) = self.std
            && s.iter().any(|v| *v == 0.0 || !v.is_finite())
        {
            return Err(format!("{}: {s:?} has a zero or non-finite value", key("std")));
        }
        if let Some(m) = self.mean
            && m.iter().any(|v| !v.is_finite())
        {
            return Err(format!("{}: {m:?} has a non-finite value", key("mean")));
        }
        if self.family == Family::Dbnet && self.input_size.is_some() {
            return Err(format!("{}: dbnet models take the frame's aspect (max_side, min_side), not a fixed size", key("input_size")));
        }
        for (k, v) in [("min_score", self.min_score()), ("nms_iou", self.nms_iou), ("pixel_threshold", self.pixel_threshold)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{}: {v} is not from 0 to 1", key(k)));
            }
        }
        if !(self.unclip_ratio >= 0.0 && self.unclip_ratio <= 10.0) {
            return Err(format!("{}: {} is not from 0 to 10", key("unclip_ratio"), self.unclip_ratio));
        }
        if self.max_detections == 0 || self.max_detections > 10_000 {
            return Err(format!("{}: {} is not from 1 to 10000", key("max_detections"), self.max_detections));
        }
        if self.top_k == 0 {
            return Err(format!("{}: must be at least 1", key("top_k")));
        }
        Ok(())
    }
}

impl InferenceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.batch) {
            return Err(format!("config key `inference.batch`: {} is not from 1 to 256", self.batch));
        }
        if self.batch_wait_ms > 1000 {
            return Err(format!("config key `inference.batch_wait_ms`: {} is above 1000", self.batch_wait_ms));
        }
        if self.device_id < 0 {
            return Err(format!("config key `inference.device_id`: {} is negative", self.device_id));
        }
        if !(1..=256).contains(&self.threads) {
            return Err(format!("config key `inference.threads`: {} is not from 1 to 256", self.threads));
        }
        if self.library.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err("config key `inference.library`: empty; leave it out to search ORT_DYLIB_PATH and the standard places".into());
        }
        Ok(())
    }
}

/// Checks that every `detect:NAME` of `pipeline` has its `[models.NAME]` table, and every table.
pub fn validate_models(pipeline: &framelink_common::pipeline::Pipeline, models: &BTreeMap<String, ModelConfig>) -> Result<(), String> {
    for m in pipeline.models() {
        if !models.contains_key(m.as_str()) {
            let known: Vec<&str> = models.keys().map(String::as_str).collect();
            return Err(format!("config key `worker.pipeline`: detect:{m} needs a [models.{m}] table (configured models: {known:?})"));
        }
    }
    for (name, m) in models {
        m.validate(name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(extra: &str) -> Result<ModelConfig, String> {
        let path = std::env::current_exe().unwrap();
        framelink_common::config_file::from_toml_str::<ModelConfig>(&format!("path = {:?}\nfamily = \"yolo\"\n{extra}", path.display().to_string())).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_family_and_bad_keys_are_named() {
        let m = model("").unwrap();
        assert_eq!(m.min_score(), 0.25);
        assert_eq!(m.normalization(), ([0.0; 3], [1.0; 3]));
        m.validate("people").unwrap();
        for (extra, needle) in [
            ("min_score = 1.5", "models.people.min_score"),
            ("std = [1.0, 0.0, 1.0]", "models.people.std"),
            ("input_size = [0, 640]", "models.people.input_size"),
            ("max_detections = 0", "models.people.max_detections"),
        ] {
            let e = model(extra).unwrap().validate("people").unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        assert!(model("family2 = 1").is_err());
        let e = framelink_common::config_file::from_toml_str::<ModelConfig>("path = \"/nonexistent.onnx\"\nfamily = \"yolo\"").unwrap().validate("x").unwrap_err();
        assert!(e.contains("models.x.path") && e.contains("/nonexistent.onnx"), "{e}");
        let e = framelink_common::config_file::from_toml_str::<ModelConfig>("path = \"a\"\nfamily = \"ssd\"").unwrap_err().to_string();
        assert!(e.contains("ssd"), "{e}");
    }

    #[test]
    fn every_detect_needs_its_model_table() {
        let p = framelink_common::pipeline::Pipeline::parse("grayscale,detect:people").unwrap();
        let e = validate_models(&p, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("detect:people needs a [models.people] table"), "{e}");
        let mut models = BTreeMap::new();
        models.insert("people".to_owned(), model("").unwrap());
        validate_models(&p, &models).unwrap();
    }
}
