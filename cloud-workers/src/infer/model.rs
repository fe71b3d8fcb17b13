//! One model: what it is (family, input size, labels, version: the [`Spec`], shared by the
//! processing threads that prepare its inputs and decode its outputs) and its ONNX Runtime
//! session (owned by the model's stage thread, [`super::stage`]).

use std::path::Path;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::{Tensor, TensorElementType};

use super::config::{Family, InferenceConfig, ModelConfig};
use super::runtime::{Chosen, Loaded, RuntimeError, open_session};
use super::tensor::{Fit, Input, Placement, dbnet_ratio, dbnet_size, prepare};
use super::{classify, dbnet, yolo};
use crate::ops::Img;

/// One detection in a frame's pixels. Classifiers have no box.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Detection {
    pub label: String,
    pub class_id: u32,
    pub score: f32,
    #[serde(rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BoxPx>,
}

/// A box in pixels.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct BoxPx {
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
}

impl BoxPx {
    pub fn from_corners(b: [f32; 4]) -> Self {
        Self { x: b[0], y: b[1], width: (b[2] - b[0]).max(0.0), height: (b[3] - b[1]).max(0.0) }
    }
    pub fn corners(&self) -> [f32; 4] {
        [self.x, self.y, self.x + self.width, self.y + self.height]
    }
}

/// One output tensor of one frame (the batch dimension removed).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Everything about a model but its session.
#[derive(Debug)]
pub struct Spec {
    pub name: String,
    pub cfg: ModelConfig,
    pub version: String,
    /// yolo / classify: the fixed input size (W, H); dbnet: computed per frame.
    pub input_size: Option<(u32, u32)>,
    pub input_name: String,
    pub labels: Vec<String>,
    /// The model takes more than one frame per run (a dynamic batch dimension).
    pub batchable: bool,
    pub provider: Chosen,
}

impl Spec {
    pub fn label(&self, class: usize) -> String {
        match self.labels.get(class) {
            Some(l) => l.clone(),
            None if self.cfg.family == Family::Dbnet => "text".into(),
            None => format!("class_{class}"),
        }
    }

    /// The smallest image of a `w`×`h` frame that loses nothing for this model: what its input
    /// is made from (a decoder may decode at a DCT scale down to it).
    pub fn needs(&self, w: u32, h: u32) -> (u32, u32) {
        match (self.cfg.family, self.input_size) {
            (Family::Dbnet, None) => {
                // The size before rounding to multiples of 32.
                let r = dbnet_ratio(w, h, self.cfg.max_side, self.cfg.min_side).min(1.0);
                (((w as f32 * r).floor() as u32).max(1), ((h as f32 * r).floor() as u32).max(1))
            }
            (Family::Yolo, Some((iw, ih))) => {
                let s = (iw as f32 / w as f32).min(ih as f32 / h as f32).min(1.0);
                (((w as f32 * s).round() as u32).max(1), ((h as f32 * s).round() as u32).max(1))
            }
            (_, Some((iw, ih))) => (iw.min(w), ih.min(h)),
            (_, None) => (w, h),
        }
    }

    /// `img` as this model's input.
    pub fn prepare(&self, img: &Img) -> Result<Input, String> {
        let (mean, std) = self.cfg.normalization();
        let (w, h, fit) = match (self.cfg.family, self.input_size) {
            (Family::Dbnet, None) => {
                let (w, h) = dbnet_size(img.width, img.height, self.cfg.max_side, self.cfg.min_side);
                (w, h, Fit::Stretch)
            }
            (Family::Yolo, Some((w, h))) => (w, h, Fit::Letterbox),
            (_, Some((w, h))) => (w, h, Fit::Stretch),
            (_, None) => return Err(format!("model {}: no input size", self.name)),
        };
        prepare(img, w, h, fit, self.cfg.channels, mean, std)
    }

    /// The model's outputs for one frame as detections in that frame's pixels, filtered by
    /// `min_score` and `only_labels`.
    pub fn finish(&self, at: &Placement, outputs: &[Output]) -> Result<Vec<Detection>, String> {
        let out = outputs.first().ok_or("the model returned no output")?;
        let c = &self.cfg;
        let min_score = c.min_score();
        let mut dets = match c.family {
            Family::Yolo => {
                let (a, b) = match out.shape[..] {
                    [a, b] => (a, b),
                    _ => return Err(format!("a yolo output is [N, a, b]; got [N, {:?}]", out.shape)),
                };
                let layout = yolo::layout(a, b, self.labels.len())?;
                let found = yolo::decode(&out.data, a, b, layout, min_score)?;
                // The label filter before NMS (which is per class, so unwanted classes could not
                // suppress wanted ones anyway), so that the cap counts only reported boxes.
                let found = yolo::nms(found.into_iter().filter(|k| self.wanted(&self.label(k.class))).collect(), c.nms_iou, c.max_detections);
                found.into_iter().map(|k| self.detection(k.class, k.score, Some(at.to_frame(k.bbox)))).collect()
            }
            Family::Dbnet => {
                let (h, w) = match out.shape[..] {
                    [1, h, w] | [h, w] => (h, w),
                    _ => return Err(format!("a dbnet output is [N, 1, H, W]; got [N, {:?}]", out.shape)),
                };
                // The map may be smaller than the input (a stride): scale its boxes up first.
                let (sx, sy) = (self_input(at).0 / w as f32, self_input(at).1 / h as f32);
                let p = dbnet::Params { pixel_threshold: c.pixel_threshold, min_score, unclip_ratio: c.unclip_ratio, min_box_size: c.min_box_size, max_detections: c.max_detections };
                dbnet::boxes(&out.data, w, h, &p)?.into_iter().map(|(b, s)| self.detection(0, s, Some(at.to_frame([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy])))).collect()
            }
            Family::Classify => {
                let n: usize = out.shape.iter().product();
                // All classes ranked, the label filter, then the top k of what is left.
                let mut ranked: Vec<Detection> = classify::top_k(&out.data[..n], c.softmax, n, min_score).into_iter().map(|(k, s)| self.detection(k, s, None)).filter(|d| self.wanted(&d.label)).collect();
                ranked.truncate(c.top_k);
                ranked
            }
        };
        // A box squeezed to nothing (wholly in the letterbox padding, or off the frame) is no
        // detection.
        dets.retain(|d| d.bbox.is_none_or(|b| b.width > 0.0 && b.height > 0.0));
        Ok(dets)
    }

    fn wanted(&self, label: &str) -> bool {
        self.cfg.only_labels.is_empty() || self.cfg.only_labels.iter().any(|l| l == label)
    }

    fn detection(&self, class: usize, score: f32, b: Option<[f32; 4]>) -> Detection {
        Detection { label: self.label(class), class_id: class as u32, score, bbox: b.map(BoxPx::from_corners) }
    }
}

/// The model input's size for a placement (frame size × scale + 2 × pad).
fn self_input(at: &Placement) -> (f32, f32) {
    (at.width as f32 * at.scale_x + 2.0 * at.pad_x, at.height as f32 * at.scale_y + 2.0 * at.pad_y)
}

/// A model's session and spec.
pub struct Model {
    pub spec: std::sync::Arc<Spec>,
    pub session: Session,
}

impl Model {
    /// Opens `[models.NAME]` and works out its spec (input size, labels, version, batching).
    pub fn open(lib: &Loaded, icfg: &InferenceConfig, name: &str, cfg: &ModelConfig) -> Result<Model, RuntimeError> {
        let err = |reason: String| RuntimeError::Model { name: name.to_owned(), path: cfg.path.display().to_string(), reason };
        let (session, provider) = open_session(lib, icfg, name, &cfg.path)?;
        let input = session.inputs().first().ok_or_else(|| err("the model has no input".into()))?;
        let input_name = input.name().to_owned();
        if input.dtype().tensor_type() != Some(TensorElementType::Float32) {
            return Err(err(format!("input {input_name:?} is {:?}, not a float32 tensor", input.dtype())));
        }
        let shape: Vec<i64> = input.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
        if shape.len() != 4 || (shape[1] != 3 && shape[1] != -1) {
            return Err(err(format!("input {input_name:?} has shape {shape:?}; expected [N, 3, H, W]")));
        }
        if shape[0] > 1 {
            return Err(err(format!("input {input_name:?} has a fixed batch of {} frames; the worker runs a model on 1 frame or a dynamic batch (export it with a dynamic or 1-frame batch)", shape[0])));
        }
        let (fixed_w, fixed_h) = ((shape[3] > 0).then_some(shape[3] as u32), (shape[2] > 0).then_some(shape[2] as u32));
        if let Some([w, h]) = cfg.input_size
            && (fixed_w.is_some_and(|f| f != w) || fixed_h.is_some_and(|f| f != h))
        {
            return Err(err(format!("config key `models.{name}.input_size` = [{w}, {h}], but the model's input is fixed at {}x{} (W x H, -1 = dynamic)", shape[3], shape[2])));
        }
        let input_size = match (cfg.family, cfg.input_size, fixed_w, fixed_h) {
            (_, Some([w, h]), _, _) => Some((w, h)),
            (_, None, Some(w), Some(h)) => Some((w, h)),
            (Family::Dbnet, None, None, None) => None,
            (Family::Yolo, None, None, None) => Some((640, 640)),
            _ => return Err(err(format!("the input size is dynamic or partly fixed ({}x{}, W x H): set `models.{name}.input_size = [W, H]`", shape[3], shape[2]))),
        };
        let (names, model_version) = match session.metadata() {
            Ok(m) => (m.custom("names"), m.version()),
            Err(_) => (None, None),
        };
        let labels = if !cfg.labels.is_empty() { cfg.labels.clone() } else { names.map(|n| parse_names(&n)).unwrap_or_default() };
        // ONNX's model_version is unset as 0 or i64::MAX (converters differ).
        let version = cfg.version.clone().or_else(|| model_version.filter(|v| *v > 0 && *v < i64::MAX).map(|v| v.to_string())).unwrap_or_else(|| "unversioned".into());
        let spec = Spec { name: name.to_owned(), cfg: cfg.clone(), version, input_size, input_name, labels, batchable: shape[0] < 0, provider };
        // A label filter naming no label of the model would silence it for good.
        let known: Vec<String> = match (cfg.family, spec.labels.is_empty()) {
            (Family::Dbnet, true) => vec!["text".into()],
            (_, true) => Vec::new(), // class_<id> names: the class count is not known before a run
            (_, false) => spec.labels.clone(),
        };
        if let Some(unknown) = cfg.only_labels.iter().find(|l| !known.is_empty() && !known.contains(l)) {
            return Err(err(format!("config key `models.{name}.only_labels`: {unknown:?} is not a label of this model ({} labels: {})", known.len(), known.iter().take(10).cloned().collect::<Vec<_>>().join(", "))));
        }
        Ok(Model { spec: std::sync::Arc::new(spec), session })
    }

    /// Runs inputs of one size as one batch; per frame, its outputs. Also how long it took.
    pub fn run(&mut self, inputs: &[&Input]) -> Result<(Vec<Vec<Output>>, Duration), String> {
        let (w, h) = (inputs[0].width as usize, inputs[0].height as usize);
        let mut data = Vec::with_capacity(inputs.len() * 3 * w * h);
        for i in inputs {
            if (i.width as usize, i.height as usize) != (w, h) {
                return Err("inputs of one batch differ in size".into());
            }
            data.extend_from_slice(&i.data);
        }
        self.run_batch(inputs.len(), w, h, data)
    }

    /// Runs `n` frames of `w`×`h` laid out one after the other in `data` (moved into the
    /// tensor, not copied).
    pub fn run_batch(&mut self, n: usize, w: usize, h: usize, data: Vec<f32>) -> Result<(Vec<Vec<Output>>, Duration), String> {
        if data.len() != n * 3 * w * h {
            return Err(format!("{} values for {n} frames of 3x{h}x{w}", data.len()));
        }
        let tensor = Tensor::from_array(([n, 3, h, w], data)).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let outs = self.session.run(ort::inputs![self.spec.input_name.as_str() => tensor]).map_err(|e| format!("model {} failed: {e}", self.spec.name))?;
        let took = t.elapsed();
        let mut per_frame: Vec<Vec<Output>> = vec![Vec::new(); n];
        for (name, value) in outs.iter() {
            let (shape, values) = value.try_extract_tensor::<f32>().map_err(|e| format!("output {name:?}: {e}"))?;
            if shape.first().copied() != Some(n as i64) {
                return Err(format!("output {name:?} has shape {:?}; its first dimension should be the batch of {n}", &shape[..]));
            }
            let rest: Vec<usize> = shape[1..].iter().map(|&d| d as usize).collect();
            let each = values.len() / n;
            for (k, f) in per_frame.iter_mut().enumerate() {
                f.push(Output { shape: rest.clone(), data: values[k * each..(k + 1) * each].to_vec() });
            }
        }
        Ok((per_frame, took))
    }
}

/// Ultralytics' `names` metadata: `{0: 'person', 1: 'bicycle', ...}`.
pub fn parse_names(s: &str) -> Vec<String> {
    let mut pairs: Vec<(usize, String)> = Vec::new();
    for part in s.trim().trim_start_matches('{').trim_end_matches('}').split(", ") {
        if let Some((k, v)) = part.split_once(':')
            && let Ok(k) = k.trim().parse::<usize>()
        {
            pairs.push((k, v.trim().trim_matches(|c| c == '\'' || c == '"').to_owned()));
        }
    }
    pairs.sort();
    // Only a dense 0..n list is usable as a class table.
    if pairs.iter().enumerate().all(|(i, (k, _))| i == *k) { pairs.into_iter().map(|(_, v)| v).collect() } else { Vec::new() }
}

/// `path`'s file name, for messages.
pub fn file_name(path: &Path) -> String {
    path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultralytics_names_metadata() {
        assert_eq!(parse_names("{0: 'person', 1: 'bicycle', 2: 'traffic light'}"), ["person", "bicycle", "traffic light"]);
        assert!(parse_names("{1: 'a'}").is_empty());
        assert!(parse_names("").is_empty());
    }
}
