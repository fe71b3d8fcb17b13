//! The pipeline syntax every framelink component agrees on: `resize:1280x720,grayscale,blur:1.5`
//! — ops separated by commas, arguments after `:`. The worker runs pipelines (its
//! `worker.pipeline`, and the per-tile pipelines of large-image jobs); the console parses a job's
//! pipeline to plan its tiles ([`crate::tiling`]). What each op computes is defined, and
//! implemented, by the worker's `ops` module; this module knows only the syntax and the
//! geometry (output size, channels, how far each output pixel reaches into its input).
//!
//! `detect:NAME` runs the worker's `[models.NAME]` on the image as it is at that point of the
//! pipeline; to the pixels it is the identity (or draws its boxes, with `draw = true`).

use std::fmt;

/// The name of a model in `detect:NAME` (the worker's `[models.NAME]` table): 1 to
/// [`ModelName::MAX_LEN`] of `A-Z a-z 0-9 _ -`. Stored inline so that ops stay `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelName {
    len: u8,
    bytes: [u8; ModelName::MAX_LEN],
}

impl ModelName {
    pub const MAX_LEN: usize = 32;

    /// `None` unless `s` is a valid model name.
    pub fn new(s: &str) -> Option<Self> {
        let ok = !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| {
            let mut bytes = [0u8; Self::MAX_LEN];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Self { len: s.len() as u8, bytes }
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).expect("ASCII by construction")
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Grayscale,
    Blur { sigma: f32 },
    Sobel,
    Sharpen,
    Rotate { degrees: u16 },
    Resize { width: u32, height: u32 },
    Crop { x: u32, y: u32, width: u32, height: u32 },
    /// Runs the model `[models.NAME]` (the worker's inference); the image passes unchanged.
    Detect { model: ModelName },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Grayscale => write!(f, "grayscale"),
            Op::Blur { sigma } => write!(f, "blur:{sigma}"),
            Op::Sobel => write!(f, "sobel"),
            Op::Sharpen => write!(f, "sharpen"),
            Op::Rotate { degrees } => write!(f, "rotate:{degrees}"),
            Op::Resize { width, height } => write!(f, "resize:{width}x{height}"),
            Op::Crop { x, y, width, height } => write!(f, "crop:{width}x{height}+{x}+{y}"),
            Op::Detect { model } => write!(f, "detect:{model}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("pipeline op {index} `{text}`: {reason}")]
    Parse { index: usize, text: String, reason: String },
    #[error("{op} on a {width}x{height} image: {reason}")]
    Apply { op: String, width: u32, height: u32, reason: String },
}

fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (w.parse().ok()?, h.parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// The Gaussian blur's kernel radius for `sigma`: ⌈3σ⌉, at least 1. The worker's kernel and
/// the tile planner's halo both come from here.
pub fn blur_radius(sigma: f32) -> u32 {
    (3.0 * sigma).ceil().max(1.0) as u32
}

impl Op {
    fn parse(index: usize, text: &str) -> Result<Op, OpError> {
        let err = |reason: &str| OpError::Parse { index, text: text.to_owned(), reason: reason.to_owned() };
        let (name, arg) = match text.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (text, None),
        };
        let no_arg = |op: Op| if arg.is_some() { Err(err("takes no argument")) } else { Ok(op) };
        match name {
            "grayscale" | "gray" => no_arg(Op::Grayscale),
            "sobel" => no_arg(Op::Sobel),
            "sharpen" => no_arg(Op::Sharpen),
            "blur" => {
                let sigma: f32 = arg.ok_or_else(|| err("needs a sigma, e.g. blur:1.5"))?.parse().map_err(|_| err("sigma must be a number"))?;
                if !(sigma > 0.0 && sigma <= 50.0) {
                    return Err(err("sigma must be above 0 and at most 50"));
                }
                Ok(Op::Blur { sigma })
            }
            "rotate" => match arg {
                Some("90") => Ok(Op::Rotate { degrees: 90 }),
                Some("180") => Ok(Op::Rotate { degrees: 180 }),
                Some("270") => Ok(Op::Rotate { degrees: 270 }),
                _ => Err(err("needs 90, 180 or 270, e.g. rotate:90")),
            },
            "resize" => {
                let (width, height) = arg.and_then(parse_size).ok_or_else(|| err("needs a size, e.g. resize:1280x720"))?;
                Ok(Op::Resize { width, height })
            }
            "crop" => {
                let bad = || err("needs WxH+X+Y, e.g. crop:640x480+100+50");
                let mut parts = arg.ok_or_else(bad)?.split('+');
                let size = parts.next().and_then(parse_size);
                let x = parts.next().and_then(|v| v.parse().ok());
                let y = parts.next().and_then(|v| v.parse().ok());
                match (size, x, y, parts.next()) {
                    (Some((width, height)), Some(x), Some(y), None) => Ok(Op::Crop { x, y, width, height }),
                    _ => Err(bad()),
                }
            }
            "detect" => {
                let name = arg.ok_or_else(|| err("needs a model name, e.g. detect:people (the [models.people] table)"))?;
                let model = ModelName::new(name).ok_or_else(|| err(&format!("model names are 1 to {} of A-Z a-z 0-9 _ -", ModelName::MAX_LEN)))?;
                Ok(Op::Detect { model })
            }
            "" => Err(err("empty op")),
            _ => Err(err("unknown op (grayscale, blur, sobel, sharpen, rotate, resize, crop, detect)")),
        }
    }

    /// The output size for an input of `w`×`h`.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        match *self {
            Op::Rotate { degrees: 90 | 270 } => (h, w),
            Op::Resize { width, height } | Op::Crop { width, height, .. } => (width, height),
            _ => (w, h),
        }
    }

    /// Channels of the output for an input of `channels` (1 gray, 3 RGB).
    pub fn output_channels(&self, channels: u8) -> u8 {
        match self {
            Op::Grayscale | Op::Sobel => 1,
            _ => channels,
        }
    }

    /// How far (in pixels, in every direction) an output pixel of a neighbourhood op reads its
    /// input, edges clamped; `Some(0)` for per-pixel ops; `None` for ops that move pixels
    /// (rotate, crop) or resample (resize).
    pub fn radius(&self) -> Option<u32> {
        match *self {
            Op::Grayscale => Some(0),
            Op::Blur { sigma } => Some(blur_radius(sigma)),
            Op::Sobel | Op::Sharpen => Some(1),
            Op::Rotate { .. } | Op::Resize { .. } | Op::Crop { .. } | Op::Detect { .. } => None,
        }
    }
}

/// Ops applied in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline(pub Vec<Op>);

impl Pipeline {
    /// Parses `op[:arg],op[:arg],...`; an empty string is the empty pipeline.
    pub fn parse(spec: &str) -> Result<Self, OpError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(Self(Vec::new()));
        }
        spec.split(',').enumerate().map(|(i, t)| Op::parse(i + 1, t.trim())).collect::<Result<_, _>>().map(Self)
    }

    /// The final size for an input of `w`×`h`.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        self.0.iter().fold((w, h), |(w, h), op| op.output_size(w, h))
    }

    /// The models the pipeline runs (`detect:NAME`), in order, each once.
    pub fn models(&self) -> Vec<ModelName> {
        let mut out: Vec<ModelName> = Vec::new();
        for op in &self.0 {
            if let Op::Detect { model } = op
                && !out.contains(model)
            {
                out.push(*model);
            }
        }
        out
    }

    /// The final channel count for an input of `channels`.
    pub fn output_channels(&self, channels: u8) -> u8 {
        self.0.iter().fold(channels, |c, op| op.output_channels(c))
    }
}

impl fmt::Display for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(Op::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_and_errors_naming_the_op() {
        let p = Pipeline::parse("resize:1280x720, grayscale,blur:1.5,sobel").unwrap();
        assert_eq!(p.0, vec![Op::Resize { width: 1280, height: 720 }, Op::Grayscale, Op::Blur { sigma: 1.5 }, Op::Sobel]);
        assert_eq!(p.to_string(), "resize:1280x720,grayscale,blur:1.5,sobel");
        assert_eq!(Pipeline::parse("rotate:90,crop:30x40+10+20").unwrap().output_size(1920, 1080), (30, 40));
        assert_eq!(Pipeline::parse("").unwrap().0.len(), 0);
        assert_eq!(Pipeline::parse("blur:2,sobel").unwrap().output_channels(3), 1);
        assert_eq!(Pipeline::parse("sharpen,rotate:90").unwrap().output_channels(3), 3);
        for (spec, needle) in [
            ("grayscale,blurr:2", "op 2 `blurr:2`: unknown op"),
            ("blur", "needs a sigma"),
            ("blur:-1", "above 0"),
            ("rotate:45", "90, 180 or 270"),
            ("resize:0x10", "needs a size"),
            ("sobel:3", "takes no argument"),
            ("crop:1,2", "WxH+X+Y"),
            ("detect", "needs a model name"),
            ("detect:a b", "model names are"),
            ("detect:abcdefghijabcdefghijabcdefghijabc", "model names are"),
        ] {
            let e = Pipeline::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn radii() {
        assert_eq!(Op::Blur { sigma: 1.5 }.radius(), Some(5));
        assert_eq!(Op::Blur { sigma: 0.1 }.radius(), Some(1));
        assert_eq!(Op::Sobel.radius(), Some(1));
        assert_eq!(Op::Grayscale.radius(), Some(0));
        assert_eq!(Op::Rotate { degrees: 90 }.radius(), None);
    }

    #[test]
    fn detect_names_a_model_and_keeps_the_image() {
        let p = Pipeline::parse("resize:640x360,detect:people,grayscale,detect:text-v4,detect:people").unwrap();
        assert_eq!(p.to_string(), "resize:640x360,detect:people,grayscale,detect:text-v4,detect:people");
        assert_eq!(p.models().iter().map(|m| m.as_str()).collect::<Vec<_>>(), ["people", "text-v4"]);
        assert_eq!(p.output_size(1920, 1080), (640, 360));
        assert_eq!(Op::Detect { model: ModelName::new("x").unwrap() }.output_channels(3), 3);
        assert_eq!(Op::Detect { model: ModelName::new("x").unwrap() }.radius(), None);
    }
}
