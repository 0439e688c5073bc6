import torch, svgd_fx
from torch import nn
import torch.nn.functional as F

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, 128), nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)
        self.gate = nn.Parameter(torch.zeros(128))

    def forward(self, x):
        h = torch.relu(self.bn1(self.fc1(x))) * torch.sigmoid(self.gate)
        return self.fc2(h)

model = MyNet()
model_t = svgd_fx.transform(model, s=0.1)
opt = torch.optim.SGD(model.parameters(), lr=0.3)
for _ in range(3):
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt.zero_grad()
    loss = F.cross_entropy(model_t(x), y)
    loss.backward()
    opt.step()
print(svgd_fx.explain(model_t))
