"""600 KB FP32 images in, one value per image out: what a --workers engine pays to receive
large inputs (the model itself costs almost nothing)."""


class Model:
    def execute(self, inputs):
        images = inputs["INPUT0"]
        return {"OUTPUT0": images[:, 0, 0, :1].copy()}
