// Drawing mask regions on a canvas over the photo. Each region holds two hidden canvases, its
// source and its target mask (white on transparent), at the image's pixel size; the visible
// canvas shows the regions of the side being drawn, each in its own colour.

const COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55"];
// The longest side of the drawing surface: masks are resized to the output by the worker.
const MAX_SIDE = 512;

function blank(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

export class MaskPainter {
  constructor(canvas, backdrop, { maxRegions = 8 } = {}) {
    this.canvas = canvas;
    this.backdrop = backdrop;
    this.maxRegions = maxRegions;
    this.side = "source";
    this.tool = "brush";
    this.size = 24;
    this.current = 0;
    this.regions = [];
    this.last = null;
    this.resize(canvas.width, canvas.height);
    canvas.addEventListener("pointerdown", (event) => this.down(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      canvas.addEventListener(name, () => {
        this.last = null;
      });
    }
  }

  colour(index) {
    return COLOURS[index % COLOURS.length];
  }

  /** Start over on a surface of the given aspect (the photo's, or the output's). */
  resize(width, height) {
    const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
    this.width = Math.max(8, Math.round(width * scale));
    this.height = Math.max(8, Math.round(height * scale));
    this.canvas.width = this.width;
    this.canvas.height = this.height;
    this.regions = [];
    this.addRegion();
  }

  /** Show ``url`` under the canvas and size the surface to it. */
  setBackdrop(url) {
    if (!url) {
      this.backdrop.hidden = true;
      this.backdrop.removeAttribute("src");
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      this.backdrop.onload = () => {
        this.resize(this.backdrop.naturalWidth, this.backdrop.naturalHeight);
        resolve();
      };
      this.backdrop.hidden = false;
      this.backdrop.src = url;
    });
  }

  addRegion() {
    if (this.regions.length >= this.maxRegions) return false;
    this.regions.push({
      source: blank(this.width, this.height),
      target: blank(this.width, this.height),
    });
    this.current = this.regions.length - 1;
    this.redraw();
    return true;
  }

  clear() {
    const region = this.regions[this.current];
    for (const side of ["source", "target"]) {
      region[side].getContext("2d").clearRect(0, 0, this.width, this.height);
    }
    this.redraw();
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * this.width,
      y: ((event.clientY - box.top) / box.height) * this.height,
    };
  }

  down(event) {
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke(from, to) {
    const context = this.regions[this.current][this.side].getContext("2d");
    context.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    context.strokeStyle = "#fff";
    context.lineWidth = this.size * (this.width / Math.max(1, this.canvas.getBoundingClientRect().width));
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x + 0.01, to.y);
    context.stroke();
    this.redraw();
  }

  /** The regions of the side being drawn, each tinted with its colour. */
  redraw() {
    const context = this.canvas.getContext("2d");
    context.clearRect(0, 0, this.width, this.height);
    const tint = blank(this.width, this.height);
    const tinted = tint.getContext("2d");
    this.regions.forEach((region, index) => {
      tinted.globalCompositeOperation = "source-over";
      tinted.clearRect(0, 0, this.width, this.height);
      tinted.drawImage(region[this.side], 0, 0);
      tinted.globalCompositeOperation = "source-in";
      tinted.fillStyle = this.colour(index);
      tinted.fillRect(0, 0, this.width, this.height);
      context.globalAlpha = index === this.current ? 0.6 : 0.35;
      context.drawImage(tint, 0, 0);
    });
    context.globalAlpha = 1;
  }

  static painted(canvas) {
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) return true;
    return false;
  }

  static asPng(canvas) {
    // White region on black, as the API reads masks (grayscale, white = foreground).
    const out = blank(canvas.width, canvas.height);
    const context = out.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, out.width, out.height);
    context.drawImage(canvas, 0, 0);
    return out.toDataURL("image/png");
  }

  /** The drawn regions as the API's ``control.mask.regions``: pairs with both sides painted. */
  payload() {
    return this.regions
      .filter((region) => MaskPainter.painted(region.source) && MaskPainter.painted(region.target))
      .map((region) => ({
        source: MaskPainter.asPng(region.source),
        target: MaskPainter.asPng(region.target),
      }));
  }
}
