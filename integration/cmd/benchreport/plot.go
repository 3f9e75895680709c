package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
)

// A line chart drawn with the standard library only: axes, grid, series
// and numeric tick labels in a built-in 3x5 digit font (titles and legend
// are in REPORT.md, next to the image).
type series struct {
	name string
	col  color.RGBA
	ys   []float64
}

var palette = []color.RGBA{{200, 40, 40, 255}, {30, 90, 200, 255}, {20, 150, 60, 255}, {150, 80, 180, 255}}

// digits: 3x5 bitmaps of 0-9 and '.', rows top to bottom, bits left to right.
var digits = map[rune][5]uint8{
	'0': {7, 5, 5, 5, 7}, '1': {2, 6, 2, 2, 7}, '2': {7, 1, 7, 4, 7}, '3': {7, 1, 7, 1, 7}, '4': {5, 5, 7, 1, 1},
	'5': {7, 4, 7, 1, 7}, '6': {7, 4, 7, 5, 7}, '7': {7, 1, 1, 1, 1}, '8': {7, 5, 7, 5, 7}, '9': {7, 5, 7, 1, 7},
	'.': {0, 0, 0, 0, 2},
}

func drawText(img *image.RGBA, x, y int, s string, scale int) {
	for _, r := range s {
		g, ok := digits[r]
		if ok {
			for row := 0; row < 5; row++ {
				for col := 0; col < 3; col++ {
					if g[row]&(4>>col) != 0 {
						fill(img, x+col*scale, y+row*scale, scale, scale, color.RGBA{0, 0, 0, 255})
					}
				}
			}
		}
		x += 4 * scale
	}
}

func fill(img *image.RGBA, x, y, w, h int, c color.RGBA) {
	for i := x; i < x+w; i++ {
		for j := y; j < y+h; j++ {
			img.SetRGBA(i, j, c)
		}
	}
}

func line(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA, thick int) {
	dx, dy := x1-x0, y1-y0
	steps := max(abs(dx), abs(dy), 1)
	for i := 0; i <= steps; i++ {
		x := x0 + dx*i/steps
		y := y0 + dy*i/steps
		fill(img, x-thick/2, y-thick/2, thick, thick, c)
	}
}

func abs(a int) int {
	if a < 0 {
		return -a
	}
	return a
}

// niceStep picks a round tick step for a range.
func niceStep(maxv float64, ticks int) float64 {
	raw := maxv / float64(ticks)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			return m * mag
		}
	}
	return 10 * mag
}

// plotLines writes a PNG: x = 1..n (points), y from 0; tick labels in units.
func plotLines(path string, ss []series) error {
	const W, H, L, R, T, B = 800, 450, 70, 20, 20, 40
	img := image.NewRGBA(image.Rect(0, 0, W, H))
	fill(img, 0, 0, W, H, color.RGBA{255, 255, 255, 255})
	n, maxv := 0, 0.0
	for _, s := range ss {
		n = max(n, len(s.ys))
		for _, y := range s.ys {
			maxv = math.Max(maxv, y)
		}
	}
	if n == 0 || maxv == 0 {
		return fmt.Errorf("nothing to plot")
	}
	step := niceStep(maxv, 5)
	top := math.Ceil(maxv/step) * step
	px := func(i int) int { return L + (W-L-R)*i/max(n, 1) }
	py := func(v float64) int { return H - B - int(float64(H-T-B)*v/top) }
	grid := color.RGBA{225, 225, 225, 255}
	for v := 0.0; v <= top+step/2; v += step {
		line(img, L, py(v), W-R, py(v), grid, 1)
		drawText(img, 5, py(v)-5, trimNum(v), 2)
	}
	for i := 0; i <= n; i++ {
		line(img, px(i), H-B, px(i), H-B+5, color.RGBA{0, 0, 0, 255}, 1)
		drawText(img, px(i)-3, H-B+10, fmt.Sprint(i), 2)
	}
	line(img, L, T, L, H-B, color.RGBA{0, 0, 0, 255}, 2)
	line(img, L, H-B, W-R, H-B, color.RGBA{0, 0, 0, 255}, 2)
	for _, s := range ss {
		px0, py0 := px(0), py(0)
		for i, y := range s.ys {
			x1, y1 := px(i+1), py(y)
			line(img, px0, py0, x1, y1, s.col, 3)
			fill(img, x1-4, y1-4, 9, 9, s.col)
			px0, py0 = x1, y1
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func trimNum(v float64) string {
	if v == math.Trunc(v) {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}
