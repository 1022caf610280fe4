// An edge preview of a layout image, so the user sees roughly what `preprocess: "canny"` will
// hand the condition model. The worker runs OpenCV's canny (thresholds 100/200); this is a
// Sobel magnitude with the same two thresholds and one pass of hysteresis, close enough to judge
// whether a photo has usable edges.

const LOW = 100;
const HIGH = 200;
const MAX_SIDE = 384;

export function drawEdges(image, canvas) {
  const scale = Math.min(1, MAX_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
  const width = Math.max(1, Math.round(image.naturalWidth * scale));
  const height = Math.max(1, Math.round(image.naturalHeight * scale));
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height);
  const gray = new Float32Array(width * height);
  for (let i = 0; i < gray.length; i += 1) {
    gray[i] = 0.299 * rgba.data[4 * i] + 0.587 * rgba.data[4 * i + 1] + 0.114 * rgba.data[4 * i + 2];
  }
  const magnitude = new Float32Array(width * height);
  const at = (x, y) => gray[Math.min(height - 1, Math.max(0, y)) * width + Math.min(width - 1, Math.max(0, x))];
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      const gx = at(x + 1, y - 1) + 2 * at(x + 1, y) + at(x + 1, y + 1)
        - at(x - 1, y - 1) - 2 * at(x - 1, y) - at(x - 1, y + 1);
      const gy = at(x - 1, y + 1) + 2 * at(x, y + 1) + at(x + 1, y + 1)
        - at(x - 1, y - 1) - 2 * at(x, y - 1) - at(x + 1, y - 1);
      magnitude[y * width + x] = Math.abs(gx) + Math.abs(gy); // L1, as OpenCV's default
    }
  }
  const strong = (x, y) => x >= 0 && y >= 0 && x < width && y < height && magnitude[y * width + x] >= HIGH;
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      const m = magnitude[y * width + x];
      let edge = m >= HIGH;
      if (!edge && m >= LOW) {
        edge = strong(x - 1, y) || strong(x + 1, y) || strong(x, y - 1) || strong(x, y + 1);
      }
      const v = edge ? 255 : 0;
      const i = 4 * (y * width + x);
      rgba.data[i] = v;
      rgba.data[i + 1] = v;
      rgba.data[i + 2] = v;
      rgba.data[i + 3] = 255;
    }
  }
  context.putImageData(rgba, 0, 0);
}
