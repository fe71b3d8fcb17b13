//! Planning a large image's tiles so that the stitched result is **bit-identical** to running
//! the pipeline on the whole image at once.
//!
//! The output image is cut into a grid of `tile`×`tile` cores. For each core the planner walks
//! the pipeline backwards to find the input region it depends on:
//!
//! - a neighbourhood op of radius r (blur ⌈3σ⌉, sobel and sharpen 1, grayscale 0) widens the
//!   region by r on every side, clamped to the image: chained ops add up. The widening is the
//!   tile's **halo**. Every op clamps at the image's edges; a tile's edge that is the image's
//!   edge clamps the same way, and an inner edge is far enough from the core that its clamping
//!   never reaches it;
//! - `rotate` maps the region back through the rotation (the grid is transformed, not refused);
//! - `crop` shifts the region into the uncropped image;
//! - `resize` is refused: a resampling filter's weights depend on the whole image's scale
//!   and position, and a tile resized on its own is not the same image.
//!
//! Walking forwards, the planner then rewrites the pipeline for the tile: neighbourhood ops and
//! rotations run as they are; a `crop` becomes the crop of the tile's part of the rectangle. The
//! worker runs the tile's pipeline and keeps only the core (the tile's `core_offset`), which
//! goes to `core` in the output.

use crate::pipeline::{Op, Pipeline};

/// A rectangle of pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, w: u32, h: u32) -> Self {
        Self { x, y, w, h }
    }
    fn right(&self) -> u32 {
        self.x + self.w
    }
    fn bottom(&self) -> u32 {
        self.y + self.h
    }
    /// Widened by `r` on every side, clamped to a `w`×`h` image.
    fn expand(&self, r: u32, w: u32, h: u32) -> Rect {
        let (x0, y0) = (self.x.saturating_sub(r), self.y.saturating_sub(r));
        let (x1, y1) = ((self.right() + r).min(w), (self.bottom() + r).min(h));
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }
    fn intersect(&self, o: &Rect) -> Option<Rect> {
        let (x0, y0) = (self.x.max(o.x), self.y.max(o.y));
        let (x1, y1) = (self.right().min(o.right()), self.bottom().min(o.bottom()));
        (x1 > x0 && y1 > y0).then(|| Rect::new(x0, y0, x1 - x0, y1 - y0))
    }
    /// Where this rectangle of a `w`×`h` image lands after a clockwise rotation.
    fn rotated(&self, degrees: u16, w: u32, h: u32) -> Rect {
        match degrees {
            90 => Rect::new(h - self.bottom(), self.x, self.h, self.w),
            180 => Rect::new(w - self.right(), h - self.bottom(), self.w, self.h),
            270 => Rect::new(self.y, w - self.right(), self.h, self.w),
            _ => *self,
        }
    }
    /// The rectangle of a `w`×`h` image (before a clockwise rotation) that lands on this one.
    fn unrotated(&self, degrees: u16, w: u32, h: u32) -> Rect {
        match degrees {
            90 => Rect::new(self.y, h - self.right(), self.h, self.w),
            180 => Rect::new(w - self.right(), h - self.bottom(), self.w, self.h),
            270 => Rect::new(w - self.bottom(), self.x, self.h, self.w),
            _ => *self,
        }
    }
}

impl std::fmt::Display for Rect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.x, self.y, self.w, self.h)
    }
}

impl std::str::FromStr for Rect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: Vec<u32> = s.split(',').map(|p| p.trim().parse::<u32>().map_err(|_| format!("{s:?} is not x,y,w,h"))).collect::<Result<_, _>>()?;
        match v[..] {
            [x, y, w, h] if w > 0 && h > 0 && x.checked_add(w).is_some() && y.checked_add(h).is_some() => Ok(Rect::new(x, y, w, h)),
            _ => Err(format!("{s:?} is not x,y,w,h with a non-empty size")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TilingError {
    #[error("{op} cannot be tiled exactly (a resampling filter depends on the whole image): resize the result instead, or run it as a frame pipeline")]
    NotTileable { op: String },
    #[error("{op} runs a model on whole frames; large-image jobs do not run models: leave it out of the job's pipeline")]
    ModelOp { op: String },
    #[error("{op} on a {width}x{height} image: the rectangle is outside the image")]
    CropOutside { op: String, width: u32, height: u32 },
    #[error("tile size {0} is out of range (16 to 8192)")]
    TileSize(u32),
    #[error("the image is empty")]
    Empty,
}

/// One tile: what the worker gets and where its result goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tile {
    pub index: u32,
    pub col: u32,
    pub row: u32,
    /// The input region the tile carries (core's footprint plus halo), in the source image.
    pub region: Rect,
    /// The halo on each side (left, top, right, bottom), in source pixels: how far `region`
    /// reaches beyond the core's own footprint in the source.
    pub halo: [u32; 4],
    /// The pipeline the worker runs on this tile.
    pub pipeline: Pipeline,
    /// The core: where it goes in the output image.
    pub core: Rect,
    /// Where the core is in the tile's own output.
    pub core_offset: (u32, u32),
}

/// A whole job's tiles.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub width: u32,
    pub height: u32,
    pub out_width: u32,
    pub out_height: u32,
    pub out_channels: u8,
    pub tile: u32,
    pub cols: u32,
    pub rows: u32,
    pub tiles: Vec<Tile>,
}

impl Plan {
    /// The largest tile region's pixel count (the biggest tile record).
    pub fn max_region_pixels(&self) -> u64 {
        self.tiles.iter().map(|t| t.region.w as u64 * t.region.h as u64).max().unwrap_or(0)
    }
    /// The widest halo of any side of any tile.
    pub fn max_halo(&self) -> u32 {
        self.tiles.iter().flat_map(|t| t.halo).max().unwrap_or(0)
    }
}

/// Checks that `pipeline` can be tiled exactly for a `width`×`height` image.
pub fn check(pipeline: &Pipeline, width: u32, height: u32) -> Result<(), TilingError> {
    let (mut w, mut h) = (width, height);
    for op in &pipeline.0 {
        match *op {
            Op::Resize { .. } => return Err(TilingError::NotTileable { op: op.to_string() }),
            Op::Detect { .. } => return Err(TilingError::ModelOp { op: op.to_string() }),
            Op::Crop { x, y, width: cw, height: ch } if x as u64 + cw as u64 > w as u64 || y as u64 + ch as u64 > h as u64 => {
                return Err(TilingError::CropOutside { op: op.to_string(), width: w, height: h });
            }
            _ => {}
        }
        (w, h) = op.output_size(w, h);
    }
    Ok(())
}

/// Plans the tiles of a `width`×`height` image of `channels` channels under `pipeline`, with
/// output cores of `tile`×`tile`.
pub fn plan(pipeline: &Pipeline, width: u32, height: u32, channels: u8, tile: u32) -> Result<Plan, TilingError> {
    if width == 0 || height == 0 {
        return Err(TilingError::Empty);
    }
    if !(16..=8192).contains(&tile) {
        return Err(TilingError::TileSize(tile));
    }
    check(pipeline, width, height)?;
    // Image size before each op (sizes[k] is op k's input; sizes[n] the output).
    let mut sizes = vec![(width, height)];
    for op in &pipeline.0 {
        let (w, h) = *sizes.last().unwrap();
        sizes.push(op.output_size(w, h));
    }
    let (out_width, out_height) = *sizes.last().unwrap();
    let (cols, rows) = (out_width.div_ceil(tile), out_height.div_ceil(tile));
    let mut tiles = Vec::with_capacity((cols * rows) as usize);
    for row in 0..rows {
        for col in 0..cols {
            let core = Rect::new(col * tile, row * tile, tile.min(out_width - col * tile), tile.min(out_height - row * tile));
            // Backwards: what each stage needs (with halo) and the core's own footprint.
            let (mut need, mut foot) = (core, core);
            for (k, op) in pipeline.0.iter().enumerate().rev() {
                let (w, h) = sizes[k];
                match *op {
                    Op::Rotate { degrees } => {
                        need = need.unrotated(degrees, w, h);
                        foot = foot.unrotated(degrees, w, h);
                    }
                    Op::Crop { x, y, .. } => {
                        need = Rect::new(need.x + x, need.y + y, need.w, need.h);
                        foot = Rect::new(foot.x + x, foot.y + y, foot.w, foot.h);
                    }
                    _ => need = need.expand(op.radius().unwrap_or(0), w, h),
                }
            }
            let region = need;
            // Forwards: the tile's own pipeline and where its region lands at each stage.
            let mut at = region;
            let mut ops = Vec::with_capacity(pipeline.0.len());
            for (k, op) in pipeline.0.iter().enumerate() {
                let (w, h) = sizes[k];
                match *op {
                    Op::Rotate { degrees } => {
                        at = at.rotated(degrees, w, h);
                        ops.push(*op);
                    }
                    Op::Crop { x, y, width: cw, height: ch } => {
                        let part = at.intersect(&Rect::new(x, y, cw, ch)).expect("a tile's region overlaps the crop it was planned through");
                        ops.push(Op::Crop { x: part.x - at.x, y: part.y - at.y, width: part.w, height: part.h });
                        at = Rect::new(part.x - x, part.y - y, part.w, part.h);
                    }
                    _ => ops.push(*op),
                }
            }
            debug_assert!(at.x <= core.x && at.y <= core.y && at.right() >= core.right() && at.bottom() >= core.bottom());
            let halo = [foot.x - region.x, foot.y - region.y, region.right() - foot.right(), region.bottom() - foot.bottom()];
            tiles.push(Tile { index: row * cols + col, col, row, region, halo, pipeline: Pipeline(ops), core, core_offset: (core.x - at.x, core.y - at.y) });
        }
    }
    Ok(Plan { width, height, out_width, out_height, out_channels: pipeline.output_channels(channels), tile, cols, rows, tiles })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pipeline {
        Pipeline::parse(s).unwrap()
    }

    #[test]
    fn rotation_of_rectangles_round_trips() {
        let r = Rect::new(3, 5, 7, 11);
        for d in [90, 180, 270] {
            let (w, h) = (40, 30);
            let rot = r.rotated(d, w, h);
            assert_eq!(rot.unrotated(d, w, h), r, "{d}");
        }
        // 90° clockwise: the top-left pixel of a 40x30 image goes to the top-right (x = 29).
        assert_eq!(Rect::new(0, 0, 1, 1).rotated(90, 40, 30), Rect::new(29, 0, 1, 1));
        assert_eq!(Rect::new(0, 0, 1, 1).rotated(270, 40, 30), Rect::new(0, 39, 1, 1));
    }

    #[test]
    fn halos_add_up_and_stop_at_the_image_edge() {
        let plan = plan(&p("blur:1.5,sobel"), 1000, 700, 3, 256).unwrap();
        assert_eq!((plan.cols, plan.rows, plan.tiles.len()), (4, 3, 12));
        assert_eq!(plan.out_channels, 1);
        let t = &plan.tiles[5]; // col 1, row 1: inside on every side
        assert_eq!(t.halo, [6, 6, 6, 6]);
        assert_eq!(t.region, Rect::new(250, 250, 268, 268));
        assert_eq!(t.core_offset, (6, 6));
        let corner = &plan.tiles[0];
        assert_eq!(corner.halo, [0, 0, 6, 6]);
        let last = plan.tiles.last().unwrap();
        assert_eq!(last.core, Rect::new(768, 512, 232, 188));
        assert_eq!(last.region, Rect::new(762, 506, 238, 194));
        assert_eq!(plan.max_halo(), 6);
    }

    #[test]
    fn crops_are_rewritten_per_tile_and_rotations_move_the_grid() {
        let plan = plan(&p("rotate:90,crop:100x50+10+20"), 300, 200, 3, 64).unwrap();
        assert_eq!((plan.out_width, plan.out_height, plan.cols, plan.rows), (100, 50, 2, 1));
        for t in &plan.tiles {
            assert!(matches!(t.pipeline.0[1], Op::Crop { .. }));
            assert_eq!(t.halo, [0, 0, 0, 0]);
        }
        // Output (0..64, 0..50) is rotated-image (10..74, 20..70): source x = 20..70, y = 200-74..200-10.
        assert_eq!(plan.tiles[0].region, Rect::new(20, 126, 50, 64));
    }

    #[test]
    fn what_cannot_be_tiled_is_named() {
        let e = plan(&p("grayscale,resize:100x100"), 1000, 1000, 3, 256).unwrap_err();
        assert!(e.to_string().contains("resize:100x100 cannot be tiled exactly"), "{e}");
        let e = plan(&p("rotate:90,crop:100x100+950+0"), 1000, 500, 3, 256).unwrap_err();
        assert_eq!(e.to_string(), "crop:100x100+950+0 on a 500x1000 image: the rectangle is outside the image");
        assert_eq!(plan(&p("sobel"), 10, 10, 3, 8).unwrap_err(), TilingError::TileSize(8));
    }

    #[test]
    fn rect_text_round_trips() {
        let r = Rect::new(1, 2, 3, 4);
        assert_eq!(r.to_string().parse::<Rect>().unwrap(), r);
        assert!("1,2,0,4".parse::<Rect>().is_err());
        assert!("1,2,3".parse::<Rect>().is_err());
        assert!("4294967295,0,2,1".parse::<Rect>().is_err());
    }
}
